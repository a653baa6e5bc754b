"""benchmarks/starts_figure.py: the 'three starts' table of docs/results.md, checked against numpy on made-up folders."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "starts_figure", Path(__file__).resolve().parents[2] / "benchmarks" / "starts_figure.py")
sf = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sf)


def _result(folder: Path, run: str, cell: str, none: float, adaptive: float, status: str = "finished") -> None:
    d = folder / "runs" / run
    d.mkdir(parents=True)
    scores = {} if status == "failed" else {"none": {"dice_mean": none}, "adaptive": {"dice_mean": adaptive}}
    (d / "result.json").write_text(json.dumps({"run": run, "cell": cell, "status": status, "scores": scores}))


@pytest.fixture()
def folders(tmp_path):
    scratch, tuned = tmp_path / "scratch", tmp_path / "tuned"
    rng = np.random.default_rng(0)
    values = {}
    for folder, cell, n in ((scratch, "flat_eps8", 3), (scratch, "nonprivate", 2), (tuned, "flat_eps8", 3),
                            (tuned, "flat_eps8_decoder", 2), (tuned, "nonprivate", 3), (tuned, "autos_eps8", 1)):
        v = rng.uniform(0.2, 0.9, size=(n, 2))
        values[(folder.name, cell)] = v
        for k, (a, b) in enumerate(v, 1):
            _result(folder, f"{cell}_s{k}", cell, a, b, "stopped: privacy budget spent" if k == 2 else "finished")
    _result(tuned, "flat_eps8_s9", "flat_eps8", 0.0, 0.0, status="failed")  # left out, as the harness does
    _result(tuned, "public_alone", "public_alone", 0.5, 0.55, status="no private training")
    _result(tuned, "flat_eps1_s1", "flat_eps1", 0.1, 0.1)  # another ε: not in the ε = 8 table
    return scratch, tuned, values


def test_every_cell_is_numpys_mean_and_sample_sd_and_ratios_divide_by_the_fine_tuned_reference(folders, tmp_path):
    scratch, tuned, values = folders
    starts = [sf.parse_start(f"from scratch={scratch}"), sf.parse_start(f"fine-tuned={tuned}"),
              sf.parse_start(f"decoder={tuned}:decoder")]
    text, numbers = sf.table(starts, 8, ("none", "adaptive"))
    ref = values[("tuned", "nonprivate")].mean(axis=0)
    for label, key in (("from scratch", ("scratch", "flat_eps8")), ("fine-tuned", ("tuned", "flat_eps8")),
                       ("decoder", ("tuned", "flat_eps8_decoder"))):
        v = values[key]
        for j, mode in enumerate(("none", "adaptive")):
            mean, sd, n = numbers["bars"][(label, "flat")][mode]
            assert n == len(v)
            assert mean == pytest.approx(v[:, j].mean()) and sd == pytest.approx(v[:, j].std(ddof=1))
        assert f"| flat | {label} | {v[:, 0].mean():.4f} ± {v[:, 0].std(ddof=1):.4f} (n = {len(v)}), " \
               f"{v[:, 0].mean() / ref[0]:.3f} × |" in text
    one = values[("tuned", "autos_eps8")][0]
    assert numbers["bars"][("fine-tuned", "autos")]["none"] == (pytest.approx(one[0]), None, 1)
    assert numbers["bars"][("from scratch", "autos")]["none"] is None and "| Auto-S | from scratch | not run |" in text
    assert numbers["lines"]["public model alone (fine-tuned)"]["adaptive"] == (0.55, None, 1)
    scratch_ref = values[("scratch", "nonprivate")]
    assert numbers["lines"]["non-private reference (from scratch)"]["none"][0] == pytest.approx(scratch_ref[:, 0].mean())
    assert sum("non-private reference" in k for k in numbers["lines"]) == 2  # each folder once, not per start
    out = tmp_path / "fig.png"
    sf.plot(str(out), "made up", 8, starts, numbers, ("none", "adaptive"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_start_that_is_not_an_experiment_folder_is_named(tmp_path):
    with pytest.raises(SystemExit, match="start 'x'.*not a folder"):
        sf.parse_start(f"x={tmp_path}")
    with pytest.raises(SystemExit, match="LABEL=FOLDER"):
        sf.parse_start(str(tmp_path))
