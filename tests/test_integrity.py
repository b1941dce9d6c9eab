"""Nothing mixed, nothing silently corrupt, nothing run: one writer per run, verified buffer dumps, a full disk,
a moved run, policies loaded as data, and values refused before anything is created."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import torch
from fit_runs import (
    assert_histories_strictly_increasing,
    environment,
    fit_command,
    only_run,
    resume_error,
    run,
    start,
    wait_for,
)

from dime_lightning.analysis import load_policy
from dime_lightning.buffer_dump import MANIFEST, METADATA_ALLOWANCE, dump_bytes, verify_dump, write_manifest
from dime_lightning.checkpointing import CheckpointError
from dime_lightning.data import ReplayDataModule
from dime_lightning.errors import DamagedDumpError, DiskSpaceError, RunLockedError
from dime_lightning.replay import ReplayRing
from dime_lightning.resources import require_free_space
from dime_lightning.run_lock import RunLock
from dime_lightning.safe_checkpoint import checkpoint_globals


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run (300 env steps, checkpoints at 150 and 300 with their dumps) to copy from."""
    folder = tmp_path_factory.mktemp("finished")
    result = run(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "ckpt", tmp_path / "ckpt")
    shutil.copy(finished / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copytree(finished / "mlruns", tmp_path / "mlruns", dirs_exist_ok=True)
    return tmp_path / "ckpt"


# ---- one writer per run ----------------------------------------------------------------------------------
def test_a_second_lock_on_a_folder_is_refused_naming_the_holder(tmp_path):
    held = RunLock(tmp_path).acquire()
    holder = rf"another fit object of this process \(host \S+, pid {os.getpid()}, since"
    with pytest.raises(RunLockedError, match=holder):
        RunLock(tmp_path).acquire()
    held.release()
    RunLock(tmp_path).acquire().release()  # free again once released


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; from dime_lightning.run_lock import RunLock; "
                               f"lock = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
                               "time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    RunLock(tmp_path).acquire().release()  # the OS dropped the dead holder's lock: no stale lock


def test_two_processes_resuming_one_run_one_is_refused(tmp_path, finished):
    copy_run(finished, tmp_path)
    commands = [fit_command(tmp_path, "--data.total_env_steps", "600", "--ckpt_path", "last") for _ in range(2)]
    processes = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=environment()) for command in commands]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 2], outputs
    refused = outputs[[p.returncode for p in processes].index(2)]
    assert "is being written by another process (host" in refused and "pid" in refused
    row = only_run(tmp_path)
    assert row.status == "FINISHED"
    client = mlflow.MlflowClient()
    eval_steps = Counter(m.step for m in client.get_metric_history(row.run_id, "eval/return_mean"))
    assert eval_steps[600] == 1 and max(eval_steps.values()) == 1
    assert_histories_strictly_increasing(row.run_id)


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path, monkeypatch, capsys, finished):
    copy_run(finished, tmp_path)
    err = resume_error(tmp_path, monkeypatch, capsys, "--checkpoint.dirpath", str(tmp_path / "ckpt"))
    assert "already holds the checkpoints of a run" in err and "--ckpt_path last" in err


# ---- verified buffer dumps -------------------------------------------------------------------------------
def newest_dump(ckpt: Path) -> Path:
    return ckpt / "step-0000000300.buffer" / "rank0"


def test_a_truncated_dump_falls_back_to_the_newest_intact_pair(tmp_path, finished):
    ckpt = copy_run(finished, tmp_path)
    damaged = newest_dump(ckpt) / "observation.npy"
    os.truncate(damaged, 10)
    result = run(tmp_path, "--data.total_env_steps", "450", "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{damaged} has 10 bytes" in result.stderr
    assert "resuming from" in result.stderr and "step-0000000150.ckpt (env step 150)" in result.stderr
    final = torch.load(ckpt / "final.ckpt", weights_only=False, map_location="cpu")
    assert final["dime_counters"]["env_steps"] == 450
    assert final["dime_counters"]["critic_updates"] == 2 * (450 - 100)  # resumed at 150, nothing counted twice
    verify_dump(ckpt / final["ReplayDataModule"]["buffer_dump"] / "rank0",
                final["ReplayDataModule"]["ranks"][0]["buffer_manifest"])
    assert_histories_strictly_increasing(only_run(tmp_path).run_id)


def test_a_damaged_dump_named_explicitly_is_refused_and_left_as_it_is(tmp_path, monkeypatch, capsys, finished):
    ckpt = copy_run(finished, tmp_path)
    metadata = newest_dump(ckpt) / "ring.json"
    metadata.write_text("garbage")
    err = resume_error(tmp_path, monkeypatch, capsys, "--ckpt_path", str(ckpt / "step-0000000300.ckpt"))
    assert f"{metadata} has 7 bytes" in err
    assert metadata.read_text() == "garbage"  # nothing loaded, nothing rewritten


def test_verify_dump_names_the_file_that_differs(tmp_path):
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "a.memmap").write_bytes(b"\0" * 64)
    (tmp_path / "meta.json").write_text("{}")
    digest = write_manifest(tmp_path)
    assert verify_dump(tmp_path, digest)
    (tmp_path / "storage" / "a.memmap").write_bytes(b"\0" * 63 + b"\1")  # same size, other bytes
    with pytest.raises(DamagedDumpError, match=r"a\.memmap differs"):
        verify_dump(tmp_path, digest)
    (tmp_path / "storage" / "a.memmap").write_bytes(b"\0" * 64)
    (tmp_path / "extra.bin").write_bytes(b"x")
    with pytest.raises(DamagedDumpError, match=r"extra\.bin"):
        verify_dump(tmp_path, digest)
    (tmp_path / "extra.bin").unlink()
    with pytest.raises(DamagedDumpError, match="not the manifest this checkpoint wrote"):
        verify_dump(tmp_path, "0" * 64)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(DamagedDumpError, match=r"manifest\.json is missing"):
        verify_dump(tmp_path, digest)
    assert verify_dump(tmp_path, None) is False  # a dump from before manifests: unverified, not refused


# ---- policies load as data -------------------------------------------------------------------------------
def crafted(finished: Path, tmp_path: Path, edit) -> Path:
    with checkpoint_globals():
        checkpoint = torch.load(finished / "ckpt" / "final.ckpt", weights_only=True, map_location="cpu")
    edit(checkpoint)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


def test_load_policy_never_calls_what_a_checkpoint_names(tmp_path, finished):
    marker = tmp_path / "marker"

    def runs_a_command(checkpoint):  # what the previous loader would have called: subprocess.run([...], 0)
        checkpoint["dime_config"]["model"]["actor"] = {"class_path": "subprocess.run", "init_args": {}}
        checkpoint["hyper_parameters"].update(obs_dim=["touch", str(marker)], action_dim=0)

    with pytest.raises(CheckpointError, match=r"'subprocess\.run' is not one this loader builds"):
        load_policy(crafted(finished, tmp_path, runs_a_command))
    assert not marker.exists()


@pytest.mark.parametrize(("init_args", "message"), [
    ({"hidden_dim": 32, "command": "x"}, "takes no argument 'command'"),
    ({"hidden_dim": {"class_path": "os.system"}}, "is not a plain value"),
])
def test_load_policy_checks_the_stored_actor_arguments(tmp_path, finished, init_args, message):
    def edit(checkpoint):
        checkpoint["dime_config"]["model"]["actor"]["init_args"] = init_args

    with pytest.raises(CheckpointError, match=message):
        load_policy(crafted(finished, tmp_path, edit))


def test_load_policy_builds_a_class_the_caller_passes(tmp_path, finished):
    from dime_lightning.actor import DiffusionActor

    class MyActor(DiffusionActor):
        pass

    def edit(checkpoint):
        checkpoint["dime_config"]["model"]["actor"]["class_path"] = "my_package.MyActor"

    policy = load_policy(crafted(finished, tmp_path, edit), actor_classes={"my_package.MyActor": MyActor})
    assert type(policy.actor) is MyActor


# ---- a full disk -----------------------------------------------------------------------------------------
def test_require_free_space_names_the_folder_and_the_need(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 20, 9 << 20, 1 << 20))
    with pytest.raises(DiskSpaceError, match=rf"{tmp_path} for the dump: it needs about 2\.1 MiB, 1\.0 MiB is free"):
        require_free_space(tmp_path, 2 << 20, "the dump")
    require_free_space(tmp_path, 512 << 10, "the dump")


def test_the_dump_estimate_covers_what_a_dump_writes(finished):
    data = ReplayDataModule(env_id="Pendulum-v1", total_env_steps=300, learning_starts=100, buffer_size=10_000)
    dump = finished / "ckpt" / "step-0000000300.buffer"
    written = sum(p.stat().st_size for p in dump.rglob("*") if p.is_file())
    rows = len(ReplayRing.from_dump(dump / "rank0"))
    assert rows == 300  # a dump holds the filled rows, not the capacity
    assert written <= dump_bytes(data.transition_bytes(), rows) <= written + METADATA_ALLOWANCE
    assert data.dump_need_bytes() == dump_bytes(data.transition_bytes(), 10_000)  # before setup: the capacity


def mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_full_disk_stops_the_run_clearly_and_keeps_the_last_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    if not mount_tmpfs(folder, "3m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); "
                    "test_require_free_space_names_the_folder_and_the_need covers the check")
    try:
        process = start(tmp_path, "--data.total_env_steps", "3000", "--checkpoint.every_env_steps", "300")
        wait_for(folder / "last.ckpt", process)
        free = shutil.disk_usage(folder).free
        subprocess.run(["fallocate", "-l", str(free - 150_000), str(folder / "filler")], check=True)
        assert process.wait(timeout=300) == 4
        log = next(tmp_path.glob("log-*.txt")).read_text()
        assert f"not enough disk space in {folder}" in log and "it needs about" in log
        assert sorted(p.name for p in folder.iterdir()) == [
            ".writer.lock", "filler", "last.ckpt", "step-0000000300.buffer", "step-0000000300.ckpt"]
        row = only_run(tmp_path)
        assert row.status == "FAILED" and "not enough disk space" in row["tags.error"]
        (folder / "filler").unlink()
        result = run(tmp_path, "--data.total_env_steps", "600", "--checkpoint.every_env_steps", "300",
                     "--ckpt_path", "last")
        assert result.returncode == 0, result.stderr[-3000:]
        assert only_run(tmp_path).status == "FINISHED"
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ---- a moved run -----------------------------------------------------------------------------------------
def test_a_run_moved_to_another_store_continues_in_a_new_run_that_says_where_from(tmp_path, finished):
    shutil.copytree(finished / "ckpt", tmp_path / "ckpt")  # the checkpoints, not the store
    source = only_run(finished).run_id
    result = run(tmp_path, "--data.total_env_steps", "450", "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"MLflow run {source}" in result.stderr and "continuing in a new run" in result.stderr
    row = only_run(tmp_path)
    assert row.status == "FINISHED" and row.run_id != source
    assert row["tags.dime.source_run_id"] == source and row["tags.dime.source_env_step"] == "300"
    assert mlflow.MlflowClient().get_metric_history(row.run_id, "eval/return_mean")[-1].step == 450


# ---- values refused before anything is created ----------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["--model.update.betas", "[2.0,0.5]"], "model.update.betas must be two floats in [0, 1)"),
    (["--data.buffer_size", "1000000000000"], "data.buffer_size 1000000000000 with data.storage 'memory'"),
    (["--model.update.gamma", "nan"], "nan is not a finite float"),
    (["--model.update.critic_lr=inf"], "inf is not a finite float"),
    (["--mlflow.tracking_uri", "http://127.0.0.1:9"], "is not usable"),  # checked before the folder is locked
])
def test_values_are_refused_before_anything_is_created(tmp_path, monkeypatch, capsys, args, message):
    err = resume_error(tmp_path, monkeypatch, capsys, "--checkpoint.dirpath", str(tmp_path / "ckpt"), *args)
    assert message in err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_binary_config_file_is_named(tmp_path, monkeypatch, capsys):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)))
    err = resume_error(tmp_path, monkeypatch, capsys, "--config", str(binary))
    assert f"config file {binary} is not UTF-8 text" in err


def test_a_run_stopped_before_its_first_checkpoint_is_explained(tmp_path, monkeypatch, capsys):
    (tmp_path / "checkpoints" / "0123456789abcdef0123456789abcdef").mkdir(parents=True)
    err = resume_error(tmp_path, monkeypatch, capsys, "--ckpt_path", "last")
    assert "stopped before its first checkpoint" in err and "0123456789abcdef0123456789abcdef" in err



def test_a_stop_signal_on_a_full_disk_still_stops_cleanly(tmp_path, monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from dime_lightning.checkpointing import EnvStepCheckpoint

    def full(self, trainer, pl_module):
        raise DiskSpaceError(f"not enough disk space in {tmp_path}")

    monkeypatch.setattr(EnvStepCheckpoint, "save", full)
    checkpointer = EnvStepCheckpoint(dirpath=str(tmp_path))
    with caplog.at_level(logging.INFO):  # no exception: Lightning goes on to mark the run KILLED and flush it
        checkpointer.on_exception(SimpleNamespace(world_size=1), SimpleNamespace(env_steps=42), SIGTERMException())
    assert f"Stopped at env step 42 without a checkpoint: not enough disk space in {tmp_path}" in caplog.text
