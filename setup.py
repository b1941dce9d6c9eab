"""Packaging for dime_lightning: DIME (diffusion-based maximum-entropy RL) in PyTorch and Lightning."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VIDEO = ["imageio>=2.34", "imageio-ffmpeg>=0.5"]
SLURM = ["submitit>=1.5.4,<2"]  # 1.5.4: the version tested with SLURM 22.05

setup(
    name="dime-lightning",
    version="0.1.0",
    description="DIME: diffusion-based maximum-entropy reinforcement learning with PyTorch, Lightning and TorchRL",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["dime_lightning", "dime_lightning.*"]),
    include_package_data=True,
    # the task configs (a checkout's conf/ links to dime_lightning/conf): `--config conf/ant.yaml` works installed
    package_data={"dime_lightning": ["reference_data/*.csv", "reference_data/*.md", "conf/*.yaml", "conf/base/*.yaml"]},
    install_requires=[
        # Install the CPU build first on machines without CUDA: `pip install torch==2.13.0`. Tested with 2.13 only
        # (the build on the project's machines); older releases are not tested.
        "torch>=2.5",
        # Collectors, replay buffers and env transforms (public API only). Tested: torchrl 0.13.3 with tensordict
        # 0.13.0, and 0.14.1 with 0.14.3 (data, resume, multi-worker collection, DDP, update tests); 0.15 is not
        # released. Each TorchRL minor takes its own tensordict minor, which its own requirements enforce.
        "torchrl>=0.13,<0.15",
        "tensordict>=0.13,<0.15",
        # Tested: 2.6.0 and 2.6.6 (tests/test_compat.py, which checks the private Lightning parts that
        # dime_lightning/compat.py relies on, plus fit, resume and DDP-strategy tests). 2.5.6 fails: its Trainer.fit has
        # no weights_only, which every resume uses. 2.7 is not released: compat.py must be checked against it.
        "lightning>=2.6,<2.7",
        "jsonargparse[signatures]>=4.35",
        "gymnasium[mujoco]>=1.0,<2",
        # MuJoCo below 4 so that Gymnasium MuJoCo v5 and dm_control share one environment: dm_control 1.0.50
        # needs mujoco>=3.17 and fails on MuJoCo 4 (AttributeError: 'MjModel' object has no attribute
        # 'flex_vertedge'), which gymnasium[mujoco] would otherwise pull. MuJoCo 4 is split into mujoco,
        # mujoco-core and mujoco-studio; with this pin none of the 4.x parts is installed.
        "mujoco>=3.2,<4",
        # Tested: 3.9.0 and 3.17.2 (tracking, outage, fit and resume tests). MLflow 3.0-3.8 import
        # sqlalchemy.pool.FallbackAsyncAdaptedQueuePool, which SQLAlchemy 2.1 (what a fresh install gets) removed:
        # 3.0.1 cannot open the sqlite store (ImportError); 3.9 guards that import.
        "mlflow>=3.9,<4",
        "matplotlib>=3.8",
        "numpy>=1.26",
        # the lock under which the first of several fits started together creates the sqlite MLflow store
        "filelock>=3.12",
        # free memory before a replay buffer is allocated (resources.py), RSS in the soak benchmark. Tested: 7.2
        "psutil>=5.9",
        # IQM and stratified-bootstrap confidence intervals (compare --reference). rliable 1.2 needs arch<8, and
        # arch 7.x fails to import with pandas 3 (TypeError in deprecate_kwarg), hence pandas<3.
        "rliable>=1.2,<2",
        "pandas>=2.2,<3",
    ],
    extras_require={
        # jupyterlab: `jupyter lab notebooks/` (it brings nbconvert); nbclient/ipykernel run the notebooks in tests.
        # The video packages are in dev too, so that the README's install runs tests/test_video.py.
        # pytest-xdist: the suite runs on every core (`-n auto` in pyproject.toml), most tests are CLI subprocesses
        "dev": ["pytest>=8", "pytest-xdist>=3.6", "ruff>=0.6", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                "jupyterlab>=4.6,<5", "nbconvert>=7.16", *VIDEO, *SLURM],
        # eval.video: H.264 MP4 through imageio's FFmpeg plugin (imageio-ffmpeg ships the ffmpeg binary)
        "video": VIDEO,
        # reproduce --launcher slurm (tests/test_slurm.py runs it on a local SLURM cluster, so dev has it too)
        "slurm": SLURM,
        # dm_control 1.0.50 is the version tested with mujoco 3.17 (the newest MuJoCo below 4, see above).
        "dmc": ["dm_control>=1.0.50,<1.1"],
        # MyoSuite's hand tasks (conf/myo_*.yaml). myosuite 3.0.0 requires gymnasium<1.3: with this extra pip
        # resolves gymnasium 1.2.3 (and websockets<17 for its viewer) instead of 1.4; the whole test suite passes on
        # both. myo-sim 0.2.3 (the models, from the package index) needs mujoco>=3.4; nothing is downloaded at run time.
        "myo": ["myosuite==3.0.0"],
    },
    entry_points={"console_scripts": ["dime-fit=dime_lightning.fit:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
