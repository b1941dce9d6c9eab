"""Replay-buffer dumps that say what they hold: a manifest written with each dump, verified before a resume.

A dump (``replay.ReplayRing.dump``: one ``.npy`` file per key and ``ring.json``; earlier versions wrote
TorchRL's ``ReplayBuffer.dumps``, whose loader silently extends a truncated file with zeros) could be
truncated, changed or swapped on disk. So each rank's dump gets a ``manifest.json``: the size and SHA-256 of
every file the dump wrote, and the checkpoint stores the SHA-256 of
that manifest (per rank). ``verify_dump`` checks all of it — the manifest is the one this checkpoint wrote,
every listed file is there with its size and digest, and nothing else is — before anything is loaded, and
raises ``DamagedDumpError`` naming the first file that differs.

Dumps written before manifests existed carry none; ``verify_dump`` reports them as unverified (a warning,
the caller's choice) rather than refusing checkpoints that were fine.

Space: a dump holds the filled rows, ``transition_bytes × rows`` plus a few kilobytes of metadata;
``dump_bytes`` estimates it before a dump (``disk_space``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dime_lightning.errors import DamagedDumpError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
METADATA_ALLOWANCE = 64 << 10  # ring.json, the .npy headers and the manifest


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: str | Path) -> str:
    """Record every file of a finished dump (size, SHA-256) in ``directory/manifest.json``; returns the
    manifest's own SHA-256, which the checkpoint keeps."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(directory)}
    text = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True).encode()
    (directory / MANIFEST).write_bytes(text)
    return hashlib.sha256(text).hexdigest()


def verify_dump(directory: str | Path, manifest_sha256: str | None) -> bool:
    """Check a rank's dump against its manifest (and the manifest against ``manifest_sha256`` from the
    checkpoint, when the checkpoint has one). Returns False for a dump written before manifests existed
    (nothing to check against); raises ``DamagedDumpError`` naming the file for anything that differs."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        if manifest_sha256 is not None:
            raise DamagedDumpError(f"replay-buffer dump {directory} is damaged: its {MANIFEST} is missing")
        return False
    text = manifest_path.read_bytes()
    if manifest_sha256 is not None and hashlib.sha256(text).hexdigest() != manifest_sha256:
        raise DamagedDumpError(f"replay-buffer dump {directory} is damaged or belongs to another checkpoint: "
                               f"{manifest_path} is not the manifest this checkpoint wrote")
    try:
        files = json.loads(text)["files"]
        listed = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DamagedDumpError(f"replay-buffer dump {directory} is damaged: {manifest_path} cannot be read "
                               f"({type(err).__name__}: {err})") from err
    present = {str(p.relative_to(directory)) for p in _files(directory)}
    for name in sorted(set(listed) - present):
        raise DamagedDumpError(f"replay-buffer dump {directory} is damaged: {directory / name} is missing")
    for name in sorted(present - set(listed)):
        raise DamagedDumpError(f"replay-buffer dump {directory} holds a file it did not write: {directory / name}")
    for name, (size, digest) in sorted(listed.items()):
        path = directory / name
        actual = path.stat().st_size
        if actual != size:
            raise DamagedDumpError(f"replay-buffer dump {directory} is damaged: {path} has {actual} bytes, "
                                   f"the dump wrote {size}")
        if _sha256(path) != digest:
            raise DamagedDumpError(f"replay-buffer dump {directory} is damaged: {path} differs from what the "
                                   "dump wrote (SHA-256 mismatch)")
    return True


def dump_bytes(transition_bytes: int, rows: int) -> int:
    """Disk space a dump of ``rows`` stored transitions of ``transition_bytes`` each needs."""
    return transition_bytes * rows + METADATA_ALLOWANCE
