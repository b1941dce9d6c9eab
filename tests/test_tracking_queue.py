"""The tracking queue on its own (a fake store that can go down): order, memory bound and spill file, refused
records, the pending file at close, and its replay without duplicates."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from dime_lightning import tracking_queue
from dime_lightning.fit import build_cli
from dime_lightning.tracking_queue import PENDING_GLOB, QueuedClient


class FakeStore:
    """Records what is delivered; raises ConnectionError while ``down`` is set; ``gate`` pauses delivery."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.metrics: list[tuple[str, float, int]] = []
        self.params: dict[str, str] = {}
        self.status: str | None = None
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down.is_set():
            raise ConnectionError("store down")

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None) -> None:
        self._check()
        if any(p.key == "bad" for p in params):
            raise MlflowException("refused", error_code=INVALID_PARAMETER_VALUE)
        self.metrics += [(m.key, m.value, m.step) for m in metrics]
        self.params.update({p.key: p.value for p in params})

    def get_metric_history(self, run_id, key):
        self._check()
        return [Metric(k, v, 0, s) for k, v, s in self.metrics if k == key]

    def set_terminated(self, run_id, status=None, end_time=None) -> None:
        self._check()
        self.status = status

    def get_run(self, run_id) -> str:
        return f"run {run_id}"


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def log(client: QueuedClient, step: int) -> None:
    client.log_batch("r", metrics=[Metric("loss", float(step), 0, step)])


def make(store: FakeStore, tmp_path: Path, **kwargs) -> QueuedClient:
    return QueuedClient(store, "fake://store", lambda: tmp_path, **{"retry_max_wait": 0.05, "flush_timeout": 10.0,
                                                                    **kwargs})


def test_records_arrive_in_order_and_reads_pass_through(tmp_path):
    store = FakeStore()
    client = make(store, tmp_path)
    for step in range(50):
        log(client, step)
    assert client.get_run("r") == "run r"  # a read goes straight to the store
    client.set_terminated("r", "FINISHED")
    assert client.close() is None
    assert [s for _, _, s in store.metrics] == list(range(50))
    assert store.status == "FINISHED"
    assert not list(tmp_path.glob(PENDING_GLOB))


def test_an_outage_is_outlived_with_a_spill_file_beyond_the_memory_bound(tmp_path, capsys):
    store = FakeStore()
    store.down.set()
    client = make(store, tmp_path, max_pending=5)
    for step in range(20):  # never blocks although the store is down
        log(client, step)
    assert client.pending() == 20
    [spill] = tmp_path.glob(PENDING_GLOB)
    spilled = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [r["metrics"][0][3] for r in spilled[1:]] == list(range(5, 20))  # 5 in memory, the rest on disk
    wait_until(lambda: "unreachable" in capsys.readouterr().err)
    store.down.clear()
    wait_until(lambda: client.pending() == 0)
    assert [s for _, _, s in store.metrics] == list(range(20))  # each once, in order
    assert not list(tmp_path.glob(PENDING_GLOB))
    assert client.close() is None


def test_a_refused_record_is_dropped_and_the_rest_delivered(tmp_path, capsys):
    store = FakeStore()
    client = make(store, tmp_path)
    client.log_batch("r", params=[Param("bad", "1")])
    client.log_batch("r", params=[Param("good", "2")])
    assert client.close() is None
    assert store.params == {"good": "2"}
    assert "refused" in capsys.readouterr().err


def test_undelivered_records_stay_on_disk_and_replay_delivers_them_once(tmp_path, monkeypatch, capsys):
    store = FakeStore()
    store.down.set()
    client = make(store, tmp_path, max_pending=3, flush_timeout=0.2)
    for step in range(10):
        log(client, step)
    client.set_terminated("r", "FINISHED")
    path = client.close()
    assert path is not None and path.parent == tmp_path and path.match(PENDING_GLOB)
    assert "dime_lightning.tracking_queue replay" in capsys.readouterr().err
    log(client, 10)  # a write after close goes to the file too
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0] == {"header": {"tracking_uri": "fake://store"}}
    assert [r["op"] for r in records[1:]] == ["log_batch"] * 10 + ["set_terminated", "log_batch"]

    store.down.clear()
    store.metrics = [("loss", 0.0, 0), ("loss", 1.0, 1)]  # the first two arrived before the outage was noticed
    monkeypatch.setattr("mlflow.MlflowClient", lambda tracking_uri=None: store)
    assert tracking_queue.replay(tmp_path) == 0
    assert [s for _, _, s in store.metrics] == list(range(11))  # nothing twice
    assert store.status == "FINISHED"
    assert not path.exists()


def test_a_failed_replay_keeps_the_rest(tmp_path, monkeypatch):
    store = FakeStore()
    store.down.set()
    client = make(store, tmp_path, flush_timeout=0.0)
    for step in range(3):
        log(client, step)
    path = client.close()
    monkeypatch.setattr("mlflow.MlflowClient", lambda tracking_uri=None: store)
    assert tracking_queue.replay(path) == 1
    assert len(path.read_text().splitlines()) == 4  # header + the 3 records, still there


def test_replay_command_on_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        tracking_queue.main(["replay", str(tmp_path / "nope")])
    assert exit_info.value.code == 2


def test_resuming_delivers_what_an_earlier_process_left_first(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = mlflow.MlflowClient(uri)
    run_id = store.create_run(store.create_experiment("Pendulum-v1")).info.run_id
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"state_dict": {}, "dime_counters": {}, "hyper_parameters": {"obs_dim": 3, "action_dim": 1},
                "mlflow": {"run_id": run_id}}, folder / "last.ckpt")
    record = {"op": "log_batch", "run_id": run_id, "metrics": [["eval/return_mean", -5.0, 0, 150]]}
    (folder / "mlflow-pending-20260101T000000-1.jsonl").write_text(
        json.dumps({"header": {"tracking_uri": uri}}) + "\n" + json.dumps(record) + "\n")
    build_cli(["--config", str(root / "conf" / "pendulum.yaml"), "--config", str(root / "conf" / "smoke.yaml"),
               "--mlflow.tracking_uri", uri, "--checkpoint.dirpath", str(folder), "--ckpt_path", "last"])
    assert [(m.step, m.value) for m in store.get_metric_history(run_id, "eval/return_mean")] == [(150, -5.0)]
    assert not list(folder.glob(PENDING_GLOB))


def test_a_bad_queue_setting_is_bad_input(tmp_path, monkeypatch, capsys):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", str(root / "conf" / "pendulum.yaml"), "--config", str(root / "conf" / "smoke.yaml"),
                   "--mlflow.max_pending", "0"])
    assert exit_info.value.code == 2
    assert "mlflow.max_pending" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
