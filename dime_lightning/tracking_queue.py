"""Tracking that never stops training: MLflow writes go through a bounded queue delivered by a background thread.

``QueuedClient`` wraps an ``MlflowClient``. Its writes (``log_batch``, ``set_tag``, ``log_text``,
``log_artifact``, ``update_run``, ``set_terminated``) only enqueue a JSON record and return; reads (``get_run``,
``create_run``, …) go straight to the client. One thread delivers the records in order. While the store is
unreachable the head record is retried (backoff up to ``retry_max_wait`` seconds), a warning on stderr says how
many records are pending, and training goes on. Up to ``max_pending`` records wait in memory; beyond that they
are appended to the spill file ``mlflow-pending-<start time>-<pid>.jsonl`` in ``spill_dir()`` (beside the
checkpoints), read back in order once memory has drained. ``close`` waits up to ``flush_timeout`` seconds for
delivery, then writes whatever is left to that file; ``python -m dime_lightning.tracking_queue replay <dir or
file>`` later delivers it into the run (metric values at steps the store already has are dropped, so a replay
after a partial delivery logs nothing twice).

A record the store rejects (an invalid value, a deleted run) is dropped with a warning rather than retried.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dime_lightning.errors import BadInputError
from dime_lightning.small_cli import make_parser, parse

PENDING_GLOB = "mlflow-pending-*.jsonl"  # one file per fit process: mlflow-pending-<start time>-<pid>.jsonl
REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST",
            "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED"}


def _say(message: str) -> None:
    sys.stderr.write(f"dime_lightning.tracking: {message}\n")
    sys.stderr.flush()


def _rejected(err: Exception) -> bool:
    """The store answered and refused the record (retrying cannot help)."""
    return getattr(err, "error_code", None) in REJECTED


def deliver(client: Any, record: dict[str, Any], seen: dict[tuple[str, str], int] | None = None) -> None:
    """Send one record with a plain ``MlflowClient``. ``seen`` (run id, key) → last step: when given, metric
    values at steps the run already has are dropped first (after an attempt whose outcome is unknown, and on
    replay); missing keys are looked up in the store, and ``seen`` is updated with what was sent."""
    from mlflow.entities import Metric, Param, RunTag

    op, run_id = record["op"], record["run_id"]
    if op == "log_batch":
        metrics = record.get("metrics", [])
        if seen is not None and metrics:
            for key in {m[0] for m in metrics} - {k for r, k in seen if r == run_id}:
                seen[run_id, key] = max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            metrics = [m for m in metrics if m[3] > seen[run_id, m[0]]]
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in metrics],
                         params=[Param(k, v) for k, v in record.get("params", [])],
                         tags=[RunTag(k, v) for k, v in record.get("tags", [])], synchronous=True)
        if seen is not None:
            for key, _, _, step in metrics:
                seen[run_id, key] = max(seen[run_id, key], step)
    elif op == "set_tag":
        client.set_tag(run_id, record["key"], record["value"], synchronous=True)
    elif op == "log_text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif op == "log_artifact":
        client.log_artifact(run_id, record["local_path"], record.get("artifact_path"))
    elif op == "update_run":
        client.update_run(run_id, status=record.get("status"), name=record.get("name"))
    elif op == "set_terminated":
        client.set_terminated(run_id, status=record.get("status"), end_time=record.get("end_time"))
    else:
        raise BadInputError(f"unknown tracking record {op!r}")


MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch


def _metrics_only(record: dict[str, Any]) -> bool:
    return record["op"] == "log_batch" and not record.get("params") and not record.get("tags")


def coalesce(records: list[dict[str, Any]], start: int = 0) -> tuple[dict[str, Any], int]:
    """The record at ``start`` merged with the metric-only ``log_batch`` records of the same run that follow it
    (up to MLflow's batch limit): one request instead of many after an outage. Returns (record, how many)."""
    first = records[start]
    if not _metrics_only(first):
        return first, 1
    metrics, count = list(first["metrics"]), 1
    for record in itertools.islice(records, start + 1, None):
        if (not _metrics_only(record) or record["run_id"] != first["run_id"]
                or len(metrics) + len(record["metrics"]) > MAX_METRICS_PER_BATCH):
            break
        metrics += record["metrics"]
        count += 1
    return {**first, "metrics": metrics}, count


class QueuedClient:
    """An ``MlflowClient`` whose writes never block or fail the caller (see the module docstring)."""

    def __init__(self, client: Any, tracking_uri: str, spill_dir: Callable[[], Path | None],
                 max_pending: int = 10_000, flush_timeout: float = 60.0, retry_max_wait: float = 30.0,
                 warn_every: float = 30.0) -> None:
        self._client = client
        self._uri = tracking_uri
        self._spill_dir = spill_dir
        self._max_pending = max(1, max_pending)
        self._flush_timeout = flush_timeout
        self._retry_max_wait = retry_max_wait
        self._warn_every = warn_every
        self._memory: collections.deque[dict[str, Any]] = collections.deque()
        self._spill_path: Path | None = None
        self._spilled = 0  # records in the spill file not yet read back
        self._spill_offset = 0  # byte offset of the first unread one
        self._cond = threading.Condition()
        self._closing = self._stopped = False
        self._thread: threading.Thread | None = None
        self._file_name = PENDING_GLOB.replace("*", f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")

    def __getattr__(self, name: str) -> Any:  # reads and anything else: the wrapped client, synchronously
        if name.startswith("_"):  # never forward private names (and no recursion before __init__ has run)
            raise AttributeError(name)
        return getattr(self._client, name)

    # ---- writes: enqueue -------------------------------------------------------------------------------
    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = (),
                  synchronous: bool | None = None) -> None:
        self._put({"op": "log_batch", "run_id": run_id,
                   "metrics": [[m.key, float(m.value), int(m.timestamp), int(m.step)] for m in metrics],
                   "params": [[p.key, str(p.value)] for p in params], "tags": [[t.key, str(t.value)] for t in tags]})

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> None:
        self._put({"op": "set_tag", "run_id": run_id, "key": key, "value": str(value)})

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._put({"op": "log_text", "run_id": run_id, "text": text, "artifact_file": artifact_file})

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self._put({"op": "log_artifact", "run_id": run_id, "local_path": str(Path(local_path).resolve()),
                   "artifact_path": artifact_path})

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        self._put({"op": "update_run", "run_id": run_id, "status": status, "name": name})

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self._put({"op": "set_terminated", "run_id": run_id, "status": status,
                   "end_time": end_time or int(time.time() * 1000)})

    def _put(self, record: dict[str, Any]) -> None:
        with self._cond:
            if self._stopped:
                self._append_to_file([record])
                return
            if self._spilled == 0 and len(self._memory) < self._max_pending:
                self._memory.append(record)
            else:
                self._append_to_file([record])
                self._spilled += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlflow-delivery", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    # ---- the spill file --------------------------------------------------------------------------------
    def pending_path(self) -> Path:
        """This process's ``mlflow-pending-<start time>-<pid>.jsonl`` in the spill folder (the checkpoint folder
        of the run): a resumed run never mixes its records with those an earlier process left."""
        if self._spill_path is None:
            folder = Path(self._spill_dir() or ".")
            folder.mkdir(parents=True, exist_ok=True)
            self._spill_path = folder / self._file_name
        return self._spill_path

    def _append_to_file(self, records: list[dict[str, Any]], path: Path | None = None) -> None:
        path = path or self.pending_path()
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a") as file:
            if new:
                file.write(json.dumps({"header": {"tracking_uri": self._uri}}) + "\n")
            file.writelines(json.dumps(r) + "\n" for r in records)
            file.flush()
            os.fsync(file.fileno())

    def _read_back(self) -> None:
        """Move up to ``max_pending`` spilled records, in order, into memory (lock held)."""
        path = self.pending_path()
        with open(path) as file:
            file.seek(self._spill_offset)
            while len(self._memory) < self._max_pending and self._spilled:
                line = file.readline()
                if not line:
                    break
                record = json.loads(line)
                if "header" not in record:
                    self._memory.append(record)
                    self._spilled -= 1
            self._spill_offset = file.tell()
        if self._spilled == 0:
            path.unlink(missing_ok=True)
            self._spill_offset = 0

    # ---- delivery --------------------------------------------------------------------------------------
    def pending(self) -> int:
        """Records not yet delivered (in memory and spilled)."""
        with self._cond:
            return len(self._memory) + self._spilled

    def _run(self) -> None:
        failures, last_warning, seen, single = 0, -float("inf"), None, False
        while True:
            with self._cond:
                while not self._memory and not self._spilled and not self._closing:
                    self._cond.wait()
                if self._stopped or (self._closing and not self._memory and not self._spilled):
                    return
                if not self._memory:
                    self._read_back()
                first = self._memory[0]
                record, count = (first, 1) if single else coalesce(self._memory)
            try:
                deliver(self._client, record, seen)
            except Exception as err:  # unreachable, timed out, locked, or refused: training never sees it
                if _rejected(err) and count > 1:
                    single = True  # find the refused one among the merged records
                    continue
                if _rejected(err):
                    _say(f"warning: the tracking store refused a {record['op']} record, dropped: "
                         f"{type(err).__name__}: {str(err)[:300]}")
                    self._pop(first, count)
                    continue
                failures, seen = failures + 1, {}
                now = time.monotonic()
                if now - last_warning >= self._warn_every:
                    last_warning = now
                    spilled = f", {self._spilled} of them in {self._spill_path}" if self._spilled else ""
                    _say(f"warning: MLflow tracking store {self._uri} is unreachable ({type(err).__name__}); "
                         f"{self.pending()} records pending{spilled}; training goes on and they are sent, "
                         "in order, when it is back")
                with self._cond:
                    if not self._stopped:
                        self._cond.wait(min(2.0 ** min(failures - 1, 10) * 0.5, self._retry_max_wait))
                continue
            if failures:
                _say(f"MLflow tracking store {self._uri} is reachable again; delivering "
                     f"{self.pending() - count} pending records")
            failures, seen, single = 0, None, False
            self._pop(first, count)

    def _pop(self, first: dict[str, Any], count: int) -> None:
        with self._cond:
            if self._memory and self._memory[0] is first:
                for _ in range(count):
                    self._memory.popleft()
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> Path | None:
        """Deliver what is pending (up to ``timeout`` seconds, default ``flush_timeout``); anything left goes to
        the pending file, whose path is returned (None when everything was delivered)."""
        deadline = time.monotonic() + (self._flush_timeout if timeout is None else timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._memory or self._spilled) and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(deadline - time.monotonic(), 0.01)))
            self._stopped = True
            self._cond.notify_all()
            if not self._memory and not self._spilled:
                return None
            left = list(self._memory)
            self._memory.clear()
            if self._spilled:
                with open(self.pending_path()) as file:
                    file.seek(self._spill_offset)
                    left += [r for line in file if line.strip() and "header" not in (r := json.loads(line))]
            self._spilled = 0
            path = self.pending_path()
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.unlink(missing_ok=True)
            self._append_to_file(left, tmp)
            os.replace(tmp, path)
        _say(f"warning: {len(left)} tracking records could not be delivered to {self._uri}; they are kept in "
             f"{path}. Deliver them later with: python -m dime_lightning.tracking_queue replay {path.parent}")
        return path


def replay(target: Path, tracking_uri: str | None = None) -> int:
    """Deliver the records of ``target`` (a pending file, or a folder searched for them) in order; a file is
    removed once all its records are delivered, or rewritten with the rest on a failure. Returns the number of
    files that still hold records."""
    import mlflow

    target = Path(target)
    files = [target] if target.is_file() else sorted(target.rglob(PENDING_GLOB))  # by name: oldest first
    if not files:
        _say(f"no {PENDING_GLOB} under {target}: nothing to replay")
        return 0
    left_files = 0
    for path in files:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        header = next((line["header"] for line in lines if "header" in line), {})
        records = [line for line in lines if "header" not in line]
        uri = tracking_uri or header.get("tracking_uri")
        client = mlflow.MlflowClient(tracking_uri=uri)
        done, seen = 0, {}
        try:
            while done < len(records):
                record, count = coalesce(records, done)
                try:
                    deliver(client, record, seen)
                except Exception as err:
                    if not _rejected(err):
                        raise
                    if count > 1:  # deliver the merged ones one by one to find the refused one
                        count = 1
                        try:
                            deliver(client, records[done], seen)
                        except Exception as single_err:
                            if not _rejected(single_err):
                                raise
                            _say(f"warning: {path}: the store refused a record, dropped: {single_err}")
                    else:
                        _say(f"warning: {path}: the store refused a {record['op']} record, dropped: {err}")
                done += count
        except Exception as err:
            rest = records[done:]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in [{"header": header}, *rest]))
            os.replace(tmp, path)
            _say(f"error: {path}: {done} of {len(records)} records delivered to {uri}, {len(rest)} kept "
                 f"({type(err).__name__}: {str(err)[:300]})")
            left_files += 1
            continue
        path.unlink()
        _say(f"{path}: {len(records)} records delivered to {uri}")
    return left_files


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("dime_lightning.tracking_queue",
                         "Deliver tracking records kept while the MLflow store was down.")
    replay_parser = make_parser("dime_lightning.tracking_queue replay",
                                "Deliver the mlflow-pending-*.jsonl files under a folder.")
    replay_parser.add_argument("target", type=Path, help="a checkpoint folder (searched) or a pending file")
    replay_parser.add_argument("--tracking_uri", default=None, help="store to deliver to (default: the recorded one)")
    parser.add_subcommands().add_subcommand("replay", replay_parser, help="deliver the pending records under a folder")
    args = parse(parser, argv).replay
    if not args.target.exists():
        parser.error(f"{args.target} does not exist")
    raise SystemExit(1 if replay(args.target, args.tracking_uri) else 0)


if __name__ == "__main__":
    main()
