"""nnunet-dp: differentially private training and DP-Morph refinement for nnU-Net v2."""
from setuptools import setup

setup(
    name="nnunet-dp",
    version="0.1.0",
    description="Differentially private (DP-SGD) trainers and DP-Morph postprocessing for nnU-Net v2",
    python_requires=">=3.10",
    packages=[
        "nnunet_dp",
        "nnunet_dp.audit",
        "nnunet_dp.federated",
        "nnunet_dp.nnunet",
        "nnunet_dp.tools",
        "nnunet_dp.tools.audit",
        "nnunet_dp.commands",
        "nnunet_dp.experiment",
        "nnunet_dp.experiment.trainers",
        "nnunet_dp.postprocessing",
        "nnunet_dp.trainers",
    ],
    # postprocessing/ is installed as nnunet_dp.postprocessing (a PyPI package named `postprocessing` exists, and
    # functions in postprocessing.pkl are pickled by import path). trainers/ is shipped as nnunet_dp.trainers so
    # that `nnUNet_extTrainer` can point at its folder after any kind of install.
    package_dir={
        "nnunet_dp.postprocessing": "postprocessing",
        "nnunet_dp.trainers": "trainers",
    },
    # the advisor's calibration of the utility-vs-N law (benchmarks/n_law.py fit; nnunet_dp/law.py)
    package_data={"nnunet_dp": ["law_calibration.json"]},
    install_requires=[
        # ranges, never pins: a cluster's CUDA-matched torch stays as it is (tested here with torch 2.14.1,
        # torchvision 0.29.1; nnunetv2 2.8 itself asks for torch>=2.1.2)
        "torch>=2.1.2",
        "torchvision>=0.16",
        "nnunetv2>=2.8,<2.9",
        "opacus>=1.5,<1.7",
        "numpy",
        "scipy",
        "edt",
        "matplotlib",
        "tqdm",
    ],
    # federated: Flower's Message API and simulation engine (ray); in `test` too, so that CI runs the federated tests
    extras_require={"federated": ["flwr[simulation]>=1.42,<2"],
                    "test": ["pytest", "pytest-xdist", "hypothesis", "ruff==0.17.6", "flwr[simulation]>=1.42,<2"]},
    entry_points={
        "console_scripts": [
            "nnUNetv2_dp_demo=nnunet_dp.commands.demo:main",
            "nnUNetv2_dp_env=nnunet_dp.commands.env:main",
            "nnUNetv2_dp_privacy=nnunet_dp.commands.privacy:main",
            "nnUNetv2_dp_determine_postprocessing=nnunet_dp.commands.determine_postprocessing:main",
            "nnUNetv2_dp_alignment=nnunet_dp.commands.alignment:main",
            "nnUNetv2_dp_benchmark=nnunet_dp.commands.benchmark:main",
            "nnUNetv2_dp_experiment=nnunet_dp.commands.experiment:main",
            "nnUNetv2_dp_advise=nnunet_dp.commands.advise:main",
            "nnUNetv2_dp_audit=nnunet_dp.commands.audit:main",
            "nnUNetv2_dp_plan=nnunet_dp.commands.plan:main",
            "nnUNetv2_dp_export=nnunet_dp.commands.export:main",
            "nnUNetv2_dp_federated=nnunet_dp.commands.federated:main",
        ],
    },
)
