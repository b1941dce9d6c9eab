"""The replay buffer: one preallocated tensor per transition key, written in a ring, sampled uniformly.

Why not TorchRL's ``TensorDictReplayBuffer``: at the sizes where the framework's cost shows (Pendulum, width
8), its ``add`` of one transition took 0.41 ms and its ``sample`` of 16 transitions 0.35 ms on this
project's CPU, against 0.02 ms and 0.04 ms for the same writes and gathers on the tensors themselves
(BENCHMARKS.md, "the thin loop"). The ring does only those: ``add`` copies one transition's tensors at the
cursor, ``sample`` draws indices exactly as TorchRL's uniform sampler does (``torch.randint(0, len, (n,))``
on the storage's device, from the global generator: the same stream, so a seed gives the same minibatches)
and gathers them into a TensorDict.

Storages: ``memory`` (RAM), ``device`` (on the training device: minibatches are gathered there) and
``memmap`` (``.npy`` files in a scratch folder, mapped; numpy's format, written and read without pickle).

Dumps (``dump``/``load``) are plain data: ``ring.json`` (format, capacity, transitions written, the key
layout) and one ``.npy`` file per key holding the filled rows in storage order, read with
``allow_pickle=False`` and checked against the layout before anything is copied. ``load`` also reads dumps
that earlier versions wrote with TorchRL's ``dumps`` (a ``storage/`` folder), through TorchRL's own loader.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

from dime_lightning.errors import BadInputError, DamagedDumpError

Key = str | tuple[str, ...]
RING_FORMAT = 1
RING_META = "ring.json"
DTYPES = {str(dtype): dtype for dtype in (torch.float32, torch.bool)}  # the dtypes a dump may name
LEGACY_STORAGE = "storage"  # what TorchRL's ReplayBuffer.dumps writes (dumps of earlier versions)


TRANSITION_KEYS: tuple[Key, ...] = ("observation", "action", ("next", "observation"), ("next", "reward"),
                                    ("next", "terminated"))  # what a transition stores, the one list of them


def transition_layout(obs_dim: int, action_dim: int) -> dict[Key, tuple[tuple[int, ...], torch.dtype]]:
    """Shape (per transition) and dtype of every stored key (``TRANSITION_KEYS``, in order): float32 vectors and
    a bool ``terminated``."""
    shapes = ((obs_dim,), (action_dim,), (obs_dim,), (1,), (1,))
    dtypes = (torch.float32,) * 4 + (torch.bool,)
    return {key: (shape, dtype) for key, shape, dtype in zip(TRANSITION_KEYS, shapes, dtypes, strict=True)}


def file_name(key: Key) -> str:
    return (".".join(key) if isinstance(key, tuple) else key) + ".npy"


def _key(name: str) -> Key:
    parts = tuple(name.removesuffix(".npy").split("."))
    return parts if len(parts) > 1 else parts[0]


class ReplayRing:
    """A ring of ``capacity`` transitions of ``layout``'s keys on ``device`` (``kind``: memory, device or
    memmap; memmap keeps its files in ``scratch``)."""

    def __init__(self, capacity: int, layout: Mapping[Key, tuple[tuple[int, ...], torch.dtype]], kind: str = "memory",
                 device: torch.device | str = "cpu", scratch: Path | None = None) -> None:
        self.capacity, self.layout, self.kind = capacity, dict(layout), kind
        self.device = torch.device(device) if kind == "device" else torch.device("cpu")
        self.written = 0  # transitions ever added to this ring (the cursor is written % capacity)
        self.leaves: dict[Key, torch.Tensor] = {}
        self._arrays: dict[Key, np.ndarray] = {}  # numpy views of CPU leaves: a row written in ~1 µs
        for key, (shape, dtype) in self.layout.items():
            if kind == "memmap":
                if scratch is None:
                    raise ValueError("a memmap ring needs a scratch folder")
                array = np.lib.format.open_memmap(Path(scratch) / file_name(key), mode="w+",
                                                  dtype=torch.empty((), dtype=dtype).numpy().dtype,
                                                  shape=(capacity, *shape))
                self.leaves[key] = torch.from_numpy(array)
            else:
                self.leaves[key] = torch.zeros((capacity, *shape), dtype=dtype, device=self.device)
            if self.device.type == "cpu":
                self._arrays[key] = self.leaves[key].numpy()

    def __len__(self) -> int:
        return min(self.written, self.capacity)

    def add(self, transition: Mapping[Key, torch.Tensor | np.ndarray | float | bool]) -> None:
        """Write one transition (per key a CPU tensor, numpy array or number, shaped as the layout) at the cursor."""
        cursor = self.written % self.capacity
        if self._arrays:
            for key, array in self._arrays.items():
                array[cursor] = transition[key]
        else:
            for key, leaf in self.leaves.items():
                leaf[cursor].copy_(torch.as_tensor(transition[key]), non_blocking=True)
        self.written += 1

    def sample(self, *shape: int) -> TensorDict:
        """``prod(shape)`` transitions drawn uniformly with replacement, as a TensorDict of batch ``shape`` on the
        ring's device (the indices drawn as one flat ``randint``, then shaped)."""
        if not self.written:
            raise RuntimeError("cannot sample from an empty replay buffer")
        index = torch.randint(0, len(self), (math.prod(shape),), device=self.device).view(shape)
        return TensorDict({key: leaf[index] for key, leaf in self.leaves.items()}, batch_size=shape, device=self.device)

    def rows(self) -> TensorDict:
        """The filled rows in storage order (views), as a TensorDict: for tests and tools."""
        size = len(self)
        return TensorDict({key: leaf[:size] for key, leaf in self.leaves.items()}, batch_size=[size])

    # ---- dumps ---------------------------------------------------------------------------------------------
    def dump(self, directory: Path) -> None:
        """Write ``ring.json`` and one ``.npy`` per key (the filled rows) into the existing ``directory``."""
        directory = Path(directory)
        size = len(self)
        for key, leaf in self.leaves.items():
            np.save(directory / file_name(key), leaf[:size].cpu().numpy(), allow_pickle=False)
        meta = {"format": RING_FORMAT, "capacity": self.capacity, "written": self.written,
                "keys": {file_name(key): [list(shape), str(dtype)] for key, (shape, dtype) in self.layout.items()}}
        (directory / RING_META).write_text(json.dumps(meta, indent=1))

    @classmethod
    def from_dump(cls, directory: Path) -> ReplayRing:
        """A memory ring of a dump's capacity and layout, holding that dump (for tools and tests)."""
        meta = read_meta(directory)
        layout = {}
        for name, (shape, dtype) in meta["keys"].items():
            if dtype not in DTYPES or not all(isinstance(n, int) and n >= 1 for n in shape):
                raise DamagedDumpError(f"replay-buffer dump {directory}: {name} is {dtype} {shape}, not a stored key")
            layout[_key(name)] = (tuple(shape), DTYPES[dtype])
        ring = cls(meta["capacity"], layout)
        ring.load(directory)
        return ring

    def load(self, directory: Path) -> None:
        """Replace the contents with a dump (this format, or TorchRL's of earlier versions), checked first."""
        directory = Path(directory)
        if (directory / LEGACY_STORAGE).is_dir() and not (directory / RING_META).is_file():
            self._load_legacy(directory)
            return
        meta = read_meta(directory)
        mine = {file_name(key): [list(shape), str(dtype)] for key, (shape, dtype) in self.layout.items()}
        if meta["keys"] != mine:
            raise BadInputError(f"replay-buffer dump {directory} holds transitions {meta['keys']}, this run stores "
                                f"{mine}: it belongs to another env")
        size = min(meta["written"], meta["capacity"])
        arrays = {}
        for key, (shape, dtype) in self.layout.items():
            path = directory / file_name(key)
            try:
                array = np.load(path, allow_pickle=False, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise DamagedDumpError(f"replay-buffer dump {directory}: {path} cannot be read ({err})") from err
            expected = (size, *shape)
            if array.shape != expected or array.dtype != torch.empty((), dtype=dtype).numpy().dtype:
                raise DamagedDumpError(f"replay-buffer dump {directory}: {path} holds {array.dtype} {array.shape}, "
                                       f"expected {dtype} {expected}")
            arrays[key] = array
        self._fill(arrays, meta["written"], meta["capacity"], directory)

    def _fill(self, arrays: Mapping[Key, np.ndarray], written: int, capacity: int, source: Path) -> None:
        size = min(written, capacity)
        wrapped = written > capacity
        if size > self.capacity or (wrapped and capacity != self.capacity):
            raise BadInputError(f"replay-buffer dump {source} holds {size} transitions of a ring of {capacity} "
                                f"(written {written}); this run's buffer holds {self.capacity} per process: resume "
                                "with the same data.buffer_size and process count")
        for key, leaf in self.leaves.items():
            if self._arrays:
                self._arrays[key][:size] = arrays[key]
            else:
                leaf[:size].copy_(torch.from_numpy(np.array(arrays[key])))
        self.written = written

    def _load_legacy(self, directory: Path) -> None:
        """A dump of TorchRL's ``TensorDictReplayBuffer.dumps`` (earlier versions), read by TorchRL's loader;
        its pickled file was checked to hold plain data before (``safe_checkpoint.check_buffer_dump``)."""
        from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

        buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(self.capacity))
        buffer.loads(directory)
        size = len(buffer)
        rows = buffer.storage.get(torch.arange(size)) if size else None
        arrays = {key: rows[key].numpy() for key in self.layout} if size else {
            key: np.zeros((0, *shape)) for key, (shape, _) in self.layout.items()}
        self._fill(arrays, max(int(buffer.write_count), size), self.capacity, directory)


def read_meta(directory: Path) -> dict:
    """A ring dump's ``ring.json``, checked: format, capacity, transitions written, key layout."""
    path = Path(directory) / RING_META
    try:
        meta = json.loads(path.read_text())
        written, capacity = int(meta["written"]), int(meta["capacity"])
        keys = {str(name): [list(entry[0]), str(entry[1])] for name, entry in dict(meta["keys"]).items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise DamagedDumpError(f"replay-buffer dump {directory}: {path} cannot be read ({err})") from err
    if meta.get("format") != RING_FORMAT or written < 0 or capacity < 1:
        raise DamagedDumpError(f"replay-buffer dump {directory}: {path} is not a format-{RING_FORMAT} ring "
                               f"(format {meta.get('format')!r}, written {written}, capacity {capacity})")
    return {"written": written, "capacity": capacity, "keys": keys}
