"""One writer per run: the process that writes a checkpoint folder (and the MLflow run it names) holds its lock.

The lock is ``<checkpoint folder>/.writer.lock`` under an exclusive ``flock`` (advisory, whole file), taken
before anything of the run is written or the tracking store is opened, and held until the process exits.
A second process that would write the same folder — a double-submitted resume, a fresh run pointed at a
folder in use — is refused with ``RunLockedError`` (exit 2) naming the holder (host, pid, start time), which
the holder writes into the file. The operating system releases a ``flock`` when its holder dies, however it
dies (SIGKILL, OOM, a node lost), so a stale lock never blocks a legitimate resume: there is no pid to check
and nothing to clean up. Under DDP the process of global rank 0 holds it for the whole fit (all ranks are one
writer). On NFS, Linux maps ``flock`` to byte-range locks that the server arbitrates between hosts.

``filelock.FileLock`` (already installed) takes the same kind of lock but keeps no record of its holder,
which the refusal has to name; hence these few lines.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import socket
import time
from pathlib import Path

from dime_lightning.errors import RunLockedError

LOCK_NAME = ".writer.lock"


class RunLock:
    """The writer lock of one checkpoint folder; ``acquire`` takes it (or raises), the OS drops it at exit.

    Args:
        folder: the checkpoint folder (created if missing).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise ``RunLockedError`` naming the process that holds it. Idempotent."""
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _try_lock(fd)
            if not locked and _holder(fd).get("pid") == os.getpid():
                gc.collect()  # held by an unreachable fit object of this very process (a notebook, a benchmark)
                locked = _try_lock(fd)
            if not locked:
                raise RunLockedError(
                    f"checkpoint folder {self.folder} is being written by {_describe(_holder(fd))}; one run has one "
                    "writer: wait for it to end (or stop it), then resume with --ckpt_path last, or give this run "
                    "another --checkpoint.dirpath")
            record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up before the process ends (tests, notebooks running several fits in one process)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:  # a fit built in-process and dropped (benchmarks, notebooks) frees its folder
        self.release()


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, OSError):  # the holder is between taking the lock and writing its record
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    if not {"host", "pid", "started"} <= set(info):
        return "another process (holder not recorded yet)"
    who = "another fit object of this process" if info["pid"] == os.getpid() else "another process"
    return f"{who} (host {info['host']}, pid {info['pid']}, since {info['started']})"
