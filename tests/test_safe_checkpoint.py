"""Checkpoints are data, not code: a checkpoint (or buffer dump) whose pickle would run code is refused before
it is unpickled, through every way a checkpoint is read; the checkpoints this project writes still load."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from dime_lightning.analysis import load_policy
from dime_lightning.checkpoint_schema import read_checkpoint
from dime_lightning.errors import CheckpointError
from dime_lightning.fit import build_cli
from dime_lightning.safe_checkpoint import check_buffer_dump

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--config", str(ROOT / "conf" / "pendulum.yaml"), "--config", str(ROOT / "conf" / "smoke.yaml")]


class WritesMarker:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(tmp_path: Path, name: str = "evil.ckpt") -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    path = tmp_path / name
    torch.save({"state_dict": {}, "dime_counters": {}, "hyper_parameters": {"obs_dim": 3, "action_dim": 1},
                "payload": WritesMarker(marker)}, path)
    assert not marker.exists()
    return path, marker


def fit_error(tmp_path: Path, monkeypatch, capsys, *args: str) -> str:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        build_cli([*BASE, "--mlflow.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_fit_refuses_a_checkpoint_file_that_would_run_code(tmp_path, monkeypatch, capsys):
    path, marker = evil_checkpoint(tmp_path)
    err = fit_error(tmp_path, monkeypatch, capsys, "--ckpt_path", str(path))
    assert str(path) in err and "refused" in err and "system" in err  # names the file and the type
    assert not marker.exists()


@pytest.mark.parametrize("logged", ["final.ckpt", "last.ckpt"])  # as logged now, and by earlier versions
def test_fit_refuses_such_a_checkpoint_downloaded_from_an_mlflow_run(tmp_path, monkeypatch, capsys, logged):
    monkeypatch.chdir(tmp_path)
    path, marker = evil_checkpoint(tmp_path, logged)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("shared"))
    client.log_artifact(run.info.run_id, str(path), "checkpoints")
    path.unlink()
    err = fit_error(tmp_path, monkeypatch, capsys, "--ckpt_path", run.info.run_id)
    assert logged in err and "refused" in err and "system" in err
    assert not marker.exists()


def test_load_policy_refuses_a_checkpoint_that_would_run_code(tmp_path):
    path, marker = evil_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="refused") as error:
        load_policy(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_fit_refuses_a_buffer_dump_that_would_run_code(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    dump = tmp_path / "step-0000000150.buffer" / "rank0"
    dump.mkdir(parents=True)
    (dump / "prefetch.pkl").write_bytes(pickle.dumps(WritesMarker(marker)))
    path = tmp_path / "step-0000000150.ckpt"
    torch.save({"state_dict": {}, "dime_counters": {}, "hyper_parameters": {"obs_dim": 3, "action_dim": 1},
                "ReplayDataModule": {"buffer_dump": "step-0000000150.buffer"}}, path)
    err = fit_error(tmp_path, monkeypatch, capsys, "--ckpt_path", str(path))
    assert "prefetch.pkl" in err and "refused" in err
    assert not marker.exists()


def test_a_plain_prefetch_pickle_passes(tmp_path):
    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank0" / "prefetch.pkl").write_bytes(pickle.dumps({"version": 1, "capacity": 0, "queue": ()}))
    check_buffer_dump(tmp_path)


def test_a_checkpoint_with_the_rng_states_this_project_writes_loads_weights_only(tmp_path):
    state = {"torch_rng": torch.get_rng_state(), "cuda_rng": None, "numpy_rng": np.random.get_state(),  # noqa: NPY002
             "python_rng": random.getstate(), "policy_rng": torch.Generator().get_state()}
    path = tmp_path / "current.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "dime_counters": {"env_steps": 1},
                "hyper_parameters": {"obs_dim": 3, "action_dim": 1, "betas": [0.5, 0.999]},
                "optimizer_states": [{"param_groups": [{"betas": (0.5, 0.999)}]}],
                "ReplayDataModule": {"ranks": [state]}}, path)
    loaded = read_checkpoint(path)["ReplayDataModule"]["ranks"][0]
    expected = np.random.get_state()  # noqa: NPY002
    np.random.set_state(loaded["numpy_rng"])  # noqa: NPY002
    assert np.array_equal(np.random.get_state()[1], expected[1])  # noqa: NPY002
    random.setstate(loaded["python_rng"])
