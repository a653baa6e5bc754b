import os
import sys

# tests/ holds the shared helpers (e2e.py, nets.py); its subfolders (core, integration, commands, experiment,
# federated, postprocessing: the code's rooms) hold the tests, which may import each other's reference helpers
_HERE = os.path.dirname(os.path.abspath(__file__))
for _sub in ("", "core", "integration", "commands", "experiment", "federated", "postprocessing"):
    sys.path.insert(0, os.path.join(_HERE, _sub))
os.environ.setdefault("nnUNet_n_proc_DA", "0")
# Under pytest-xdist every worker, and every nnU-Net command it starts (tests/e2e.py passes this on), uses one OpenMP
# thread: two workers with two spinning OpenMP threads each on 2 cores slow each other down many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1" if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else "2")
# nnU-Net's own commands on a CPU (nnUNetv2_predict, nnU-Net's trainers; the planner uses nnUNet_n_proc_DA) set torch's
# threads to all cores whatever OMP_NUM_THREADS says; our trainers honour it (nnunet_dp/nnunet/threads.py). Under
# xdist, the OpenMP threads of those commands sleep at barriers instead of spinning, so they cost 2x, not 5x.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("nnUNet_def_n_proc", "1")

# The slowest files first (minutes on the 2-core CI machine, from its --durations report), so that `-n auto` with
# pytest.ini's loadfile scheduling starts them at once on different workers instead of leaving one for last.
SLOWEST_FIRST = {  # clean-clone .ci/run of 965eb2a: 533 tests in 22 min with 2 workers
    "test_e2e_nnunet.py": 11.0,
    "test_federated_flower.py": 1.8,  # ray actors import torch and nnU-Net (measured alone on 2 busy cores)
    "test_federated.py": 1.0,
    "test_experiment_levers.py": 9.0,
    "test_experiment.py": 6.5,
    "test_ddp_e2e.py": 4.0,  # not in the .ci/run above: measured alone under load (docs/multi_gpu.md)
    "test_e2e_finetune.py": 5.5,
    "test_export.py": 3.8,
    "test_release_files.py": 3.0,
    "test_demo.py": 2.3,
    "test_alignment_e2e.py": 2.0,
    "test_advise.py": 2.0,
    "test_audit_mia.py": 2.0,
    "test_dp_plan.py": 1.5,
    "test_benchmark.py": 1.5,
    "test_release_privacy.py": 1.0,
    "test_bad_inputs.py": 1.0,
}


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: -SLOWEST_FIRST.get(item.path.name, 0.0))  # stable: file order otherwise kept
