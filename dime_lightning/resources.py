"""Room before writing: free disk space before a checkpoint or buffer dump, and memory before a replay buffer.

A full disk must be a clear stop, not how a memory-mapped write finds out: TorchRL writes a dump through
memory-mapped files, and a page that the file system cannot back kills the process with SIGBUS (exit 135, no
message, the MLflow run left RUNNING). ``require_free_space`` raises ``DiskSpaceError`` (naming the folder,
the space needed and the space free) before anything of the checkpoint is written, so the previous checkpoint
stays the newest one and the run is marked FAILED with the reason. ``require_memory`` does the same for a
replay buffer that could never be allocated, at start-up (exit 2) instead of at the first env step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil

from dime_lightning.errors import BadInputError, DiskSpaceError

SPACE_MARGIN = 1.05  # estimates are of payload bytes; file-system blocks and metadata add a few percent


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(folder: str | Path) -> int:
    """Free bytes (for this user) on the file system that holds ``folder`` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing(Path(folder))).free


def require_free_space(folder: str | Path, need: int, what: str) -> None:
    """Raise ``DiskSpaceError`` unless ``folder``'s file system has room for ``need`` bytes (plus a margin)."""
    free = free_bytes(folder)
    if free < need * SPACE_MARGIN:
        raise DiskSpaceError(
            f"not enough disk space in {folder} for {what}: it needs about {human_bytes(need * SPACE_MARGIN)}, "
            f"{human_bytes(free)} is free; nothing of it was written and the previous checkpoint is intact. Free "
            "some space (or set checkpoint.dirpath elsewhere, checkpoint.keep lower, or checkpoint.save_buffer "
            "false), then resume with --ckpt_path last")


def available_memory() -> int:
    """Memory the OS can give without swapping (``psutil``'s ``available``)."""
    return int(psutil.virtual_memory().available)


def require_memory(need: int, what: str, remedy: str) -> None:
    """Raise ``ValueError`` (bad input: exit 2) when ``need`` bytes exceed the memory available now."""
    available = available_memory()
    if need > available:
        raise BadInputError(f"{what} needs about {human_bytes(need)} of memory, {human_bytes(available)} is available "
                         f"on this machine: {remedy}")
