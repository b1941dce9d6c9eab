"""What verified buffer dumps cost: the replay ring's dump, writing its manifest (SHA-256 of every file), verifying it.

    python benchmarks/dump_verify.py --transitions 1000000 --obs-dim 105 --action-dim 8 \
        --out benchmarks/results/dump_verify.json

A ``ReplayRing`` of ``--transitions`` transitions with the fit's keys (Ant-v5 shapes by default: a full
paper-size buffer) is filled with random data, dumped with ``ReplayRing.dump`` into a temporary folder
beside ``--dir``, then ``write_manifest`` and ``verify_dump`` run on it; each is timed once (the page cache is
warm for the last two: the dump has just been written).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dime_lightning.buffer_dump import verify_dump, write_manifest
from dime_lightning.replay import ReplayRing, transition_layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transitions", type=int, default=1_000_000)
    parser.add_argument("--obs-dim", type=int, default=105)
    parser.add_argument("--action-dim", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    n = args.transitions
    buffer = ReplayRing(n, transition_layout(args.obs_dim, args.action_dim))
    for leaf in buffer.leaves.values():  # every row filled, as in a full buffer
        values = torch.randn(leaf.shape)
        leaf.copy_(values > 0 if leaf.dtype == torch.bool else values)
    buffer.written = n
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        times = {}
        began = time.perf_counter()
        (Path(folder) / "rank0").mkdir()
        buffer.dump(Path(folder) / "rank0")
        times["dumps_s"] = time.perf_counter() - began
        began = time.perf_counter()
        digest = write_manifest(Path(folder) / "rank0")
        times["write_manifest_s"] = time.perf_counter() - began
        began = time.perf_counter()
        assert verify_dump(Path(folder) / "rank0", digest)
        times["verify_dump_s"] = time.perf_counter() - began
        size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    result = {"transitions": n, "obs_dim": args.obs_dim, "action_dim": args.action_dim, "dump_mib": size / 2**20,
              **{k: round(v, 2) for k, v in times.items()},
              "manifest_over_dumps": round(times["write_manifest_s"] / times["dumps_s"], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
