"""Checkpoints are data, not code: every checkpoint read goes through ``torch.load(weights_only=True)``.

A dime_lightning checkpoint holds tensors, dicts, lists, tuples, strings and numbers, plus one non-tensor
type: numpy's global RNG state (``np.random.get_state()``: a tuple holding a uint32 ``ndarray``). The allowlist
is exactly the numpy globals that rebuild such an array. A file whose pickle names any other global is refused
*before* it is unpickled (``torch.serialization.get_unsafe_globals_in_checkpoint`` reads the pickle's opcodes,
it does not execute them), with a message naming the file and the types.

The replay-buffer dump beside a checkpoint (TorchRL ``ReplayBuffer.dumps``) is memory-mapped tensors and JSON,
plus ``prefetch.pkl``, which TorchRL reads with plain ``pickle.load``: ``check_buffer_dump`` accepts only a
pickle of plain containers and scalars (no global, no object construction), checked by its opcodes.
"""

from __future__ import annotations

import contextlib
import pickletools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dime_lightning.errors import BadInputError, UnreadableCheckpointError, UnsafeCheckpointError


def _allowed_globals() -> list[Any]:
    """numpy's ndarray rebuild (the global RNG state), under the names numpy 1 and numpy 2 write."""
    reconstruct = np._core.multiarray._reconstruct  # numpy >= 2 (the module numpy 2 pickles name)
    return [
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # checkpoints written under numpy 1
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType: the MT19937 key
    ]


def allowed_global_names() -> set[str]:
    """The fully qualified names of the allowlisted globals."""
    names = set()
    for entry in _allowed_globals():
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


@contextlib.contextmanager
def checkpoint_globals() -> Iterator[None]:
    """Within this context, ``torch.load(weights_only=True)`` (also Lightning's) accepts the allowlist."""
    with torch.serialization.safe_globals(_allowed_globals()):
        yield


def unsafe_globals(path: Path) -> list[str]:
    """The globals the checkpoint's pickle names beyond torch's weights-only set and the allowlist (no
    unpickling: the opcodes are read)."""
    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    allowed = allowed_global_names()
    return [name for name in found if name not in allowed]


def safe_load(path: Path) -> Any:
    """``torch.load`` of a checkpoint, memory-mapped, with ``weights_only=True`` and the allowlist. Raises
    ``UnsafeCheckpointError`` naming the file and the types when it needs anything else, before unpickling."""
    path = Path(path)
    try:
        extra = unsafe_globals(path)
    except Exception as err:  # not a zip checkpoint, truncated, unreadable
        raise UnreadableCheckpointError(f"checkpoint {path} cannot be read (corrupt or truncated?): "
                                        f"{type(err).__name__}: {err}") from err
    if extra:
        raise UnsafeCheckpointError(
            f"checkpoint {path} is refused: loading it would need the type(s) {', '.join(extra)}, which a "
            "dime_lightning checkpoint never contains (unpickling them could run code); nothing was loaded")
    with checkpoint_globals():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1",
                 "EXT2", "EXT4", "PERSID", "BINPERSID"}


def check_plain_pickle(path: Path) -> None:
    """Refuse a pickle file that imports a global or builds an object (its opcodes are read, not run)."""
    try:
        with open(path, "rb") as file:
            names = {op.name for op, _, _ in pickletools.genops(file)}
    except Exception as err:
        raise BadInputError(f"replay-buffer file {path} cannot be read: {type(err).__name__}: {err}") from err
    bad = sorted(names & _CODE_OPCODES)
    if bad:
        raise UnsafeCheckpointError(
            f"replay-buffer file {path} is refused: its pickle constructs objects ({', '.join(bad)}), which a "
            "dime_lightning buffer dump never does (unpickling it could run code); nothing was loaded")


def check_buffer_dump(directory: Path) -> None:
    """Every pickle in a replay-buffer dump (``prefetch.pkl`` of each rank) holds plain data only; any other
    pickled file TorchRL would read (``*.pt``, ``*.t``) passes the same weights-only check as checkpoints."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in sorted(directory.rglob("*")):
        if path.suffix == ".pkl":
            check_plain_pickle(path)
        elif path.suffix in (".pt", ".t"):
            try:
                extra = unsafe_globals(path)
            except Exception as err:
                raise BadInputError(f"replay-buffer file {path} cannot be read: {type(err).__name__}: {err}") from err
            if extra:
                raise UnsafeCheckpointError(
                    f"replay-buffer file {path} is refused: loading it would need the type(s) {', '.join(extra)}")
