"""Never lose a run: SIGKILL + resume, SIGTERM, non-finite stops, bad checkpoints and tracking URIs, determinism."""

from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path

import mlflow
import pytest
import torch
from fit_runs import (
    assert_histories_strictly_increasing,
    only_run,
    resume_error,
    run,
    start,
    wait_for,
)
from tensordict import TensorDict

from dime_lightning.replay import ReplayRing


def load_buffer(directory: Path) -> TensorDict:
    return ReplayRing.from_dump(directory / "rank0").rows()


def check_kill_and_resume(tmp_path: Path, delay: float) -> None:
    total = 600
    process = start(tmp_path, "--data.total_env_steps", str(total))
    wait_for(tmp_path / "ckpt" / "last.ckpt", process)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint_file = (tmp_path / "ckpt" / "last.ckpt").resolve()
    saved = torch.load(checkpoint_file, weights_only=False, map_location="cpu")
    saved_steps = saved["dime_counters"]["env_steps"]
    saved_buffer = load_buffer(tmp_path / "ckpt" / saved["ReplayDataModule"]["buffer_dump"])
    assert len(saved_buffer) == saved_steps  # the dump holds exactly the checkpointed transitions
    kept = tmp_path / "kept.buffer"
    shutil.copytree(tmp_path / "ckpt" / saved["ReplayDataModule"]["buffer_dump"], kept)

    result = run(tmp_path, "--data.total_env_steps", str(total), "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(tmp_path / "ckpt" / "final.ckpt", weights_only=False, map_location="cpu")
    counters = final["dime_counters"]
    assert counters["env_steps"] == total
    assert counters["critic_updates"] == 2 * (total - 100)  # no update lost or repeated across the kill
    assert counters["actor_updates"] == 2 * (total - 100) // 3
    final_buffer = load_buffer(tmp_path / "ckpt" / final["ReplayDataModule"]["buffer_dump"])
    assert len(final_buffer) == total
    restored = load_buffer(kept)[:saved_steps]
    assert torch.equal(final_buffer[:saved_steps]["observation"], restored["observation"])
    assert torch.equal(final_buffer[:saved_steps]["action"], restored["action"])
    row = only_run(tmp_path)  # the same MLflow run continued
    assert row.status == "FINISHED"
    assert final["mlflow"]["run_id"] == saved["mlflow"]["run_id"] == row.run_id
    assert_histories_strictly_increasing(row.run_id)


def test_sigkill_after_first_checkpoint_then_resume(tmp_path):
    check_kill_and_resume(tmp_path, delay=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_points_then_resume(tmp_path, seed):
    check_kill_and_resume(tmp_path, delay=random.Random(seed).uniform(0.0, 6.0))


def test_sigterm_writes_a_checkpoint_and_marks_the_run_killed(tmp_path):
    process = start(tmp_path, "--data.total_env_steps", "5000")
    wait_for(tmp_path / "ckpt" / "last.ckpt", process)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["dime_counters"]["env_steps"] > 150  # written at the stop, not the periodic one
    assert only_run(tmp_path).status == "KILLED"


def test_resuming_a_finished_run_with_a_larger_total_trains_on(tmp_path):
    assert run(tmp_path, "--data.total_env_steps", "300").returncode == 0
    result = run(tmp_path, "--data.total_env_steps", "450", "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(tmp_path / "ckpt" / "final.ckpt", weights_only=False, map_location="cpu")
    assert final["dime_counters"]["env_steps"] == 450
    assert final["dime_counters"]["critic_updates"] == 2 * (450 - 100)
    row = only_run(tmp_path)
    assert row.status == "FINISHED"
    assert_histories_strictly_increasing(row.run_id)


def test_last_resumes_the_run_with_this_config_not_the_newest(tmp_path):
    for seed in ("0", "1"):  # seed 1 writes the newest checkpoint
        assert run(tmp_path, "--seed_everything", seed, "--data.total_env_steps", "150", dirpath=False).returncode == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    seed0 = runs[runs["params.seed_everything"] == "0"].run_id.iloc[0]
    result = run(tmp_path, "--seed_everything", "0", "--data.total_env_steps", "200", "--ckpt_path", "last",
                 dirpath=False)
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(tmp_path / "checkpoints" / seed0 / "final.ckpt", weights_only=False, map_location="cpu")
    assert final["dime_counters"]["env_steps"] == 200 and final["mlflow"]["run_id"] == seed0


def test_nonfinite_reward_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    result = run(tmp_path, "--data.env_id", "nan_env:NaNRewardPendulum-v0", "--data.total_env_steps", "400")
    assert result.returncode == 3
    assert "non-finite next/reward" in result.stderr and "env step 151" in result.stderr
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["dime_counters"]["env_steps"] == 150
    row = only_run(tmp_path)
    assert row.status == "FAILED" and "non-finite next/reward" in row["tags.error"]


def test_same_seed_gives_identical_losses_on_cpu(tmp_path):
    histories = []
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        folder = tmp_path / name
        folder.mkdir()
        result = run(folder, "--seed_everything", str(seed), "--data.total_env_steps", "200",
                     "--trainer.log_every_n_steps", "1")
        assert result.returncode == 0, result.stderr[-3000:]
        client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        run_id = client.search_runs(client.search_experiments()[0].experiment_id)[0].info.run_id
        histories.append([m.value for m in client.get_metric_history(run_id, "train/loss_critic")])
    assert len(histories[0]) >= 100
    assert histories[0] == histories[1]
    assert histories[0] != histories[2]


# ---- bad input around checkpoints and tracking: one clear message, non-zero exit, nothing written --------
def test_truncated_checkpoint(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really a checkpoint")
    err = resume_error(tmp_path, monkeypatch, capsys, "--ckpt_path", str(broken))
    assert "broken.ckpt cannot be read" in err


def test_foreign_checkpoint(tmp_path, monkeypatch, capsys):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    err = resume_error(tmp_path, monkeypatch, capsys, "--ckpt_path", str(foreign))
    assert "not a dime_lightning checkpoint" in err


def test_checkpoint_from_an_incompatible_config(tmp_path, monkeypatch, capsys):
    other = tmp_path / "hopper.ckpt"
    torch.save({"state_dict": {}, "dime_counters": {}, "hyper_parameters": {"obs_dim": 11, "action_dim": 3}}, other)
    err = resume_error(tmp_path, monkeypatch, capsys, "--ckpt_path", str(other))
    assert "(11, 3)" in err and "(3, 1)" in err


@pytest.mark.parametrize("ckpt_path", ["last", "does/not/exist.ckpt", "0123456789abcdef0123456789abcdef"])
def test_missing_checkpoint(tmp_path, monkeypatch, capsys, ckpt_path):
    err = resume_error(tmp_path, monkeypatch, capsys, "--ckpt_path", ckpt_path)
    assert f"--ckpt_path {ckpt_path}" in err
    assert not (tmp_path / "mlflow.db").exists()  # nothing created, not even an empty store


@pytest.mark.parametrize(("uri", "message"), [
    ("file:./mlruns", "file store is not supported"),
    ("sqlite:///no/such/dir/mlflow.db", "does not exist"),
    ("http://127.0.0.1:9", "is not usable"),
])
def test_invalid_tracking_uri(tmp_path, monkeypatch, capsys, uri, message):
    err = resume_error(tmp_path, monkeypatch, capsys, "--mlflow.tracking_uri", uri)
    assert message in err
    assert not (tmp_path / "mlruns").exists()


def test_invalid_yaml(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    err = resume_error(tmp_path, monkeypatch, capsys, "--config", str(bad))
    assert "bad.yaml" in err
