"""Per-env-step wall time of the real fit loop at the dispatch size, for comparing two versions side by side.

The fit (``throughput.fit_loop``: Pendulum-v1, 1 diffusion step, widths 8, batch 8, evaluation and checkpoints
off, progress bar on) of the checkout at ``--tree`` (default: this one) runs 2,000 warm-up and 520 learning env
steps; printed are the ms per env step of the warm-up from env step 50 (the start-up left out) and of the last
500 learning steps. To compare with an earlier commit, one core each, in one run:

    git worktree add /tmp/before <commit>
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/fit_loop_rate.py --tree /tmp/before &
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/fit_loop_rate.py; wait
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

WARMUP_FROM = 50  # the env step the warm-up is timed from


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose dime_lightning and benchmarks/throughput.py run")
    parser.add_argument("--warmup", type=int, default=2000, help="env steps of the random warm-up")
    parser.add_argument("--learning", type=int, default=500, help="learning env steps timed (after 20 more)")
    args = parser.parse_args(argv)
    tree = args.tree.resolve()
    sys.path[:0] = [str(tree), str(tree / "benchmarks")]  # that checkout's package and its throughput.py
    loaded = sys.modules.get("dime_lightning")
    if loaded is not None and Path(loaded.__file__).resolve().parents[1] != tree:  # another checkout's: forget it
        for name in [n for n in sys.modules if n.split(".")[0] in ("dime_lightning", "throughput")]:
            del sys.modules[name]
    import throughput

    class Timer(throughput.PhaseTimer):  # the warm-up timed from env step 50: the start-up left out
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            super().on_train_batch_end(trainer, pl_module, *args)
            if pl_module.env_steps == WARMUP_FROM:
                self.marks["warmup_start"] = (pl_module.env_steps, time.perf_counter())

    throughput.PhaseTimer = Timer  # fit_loop builds its timer from this name
    with tempfile.TemporaryDirectory() as workdir:
        timer, _ = throughput.fit_loop(args.learning, Path(workdir), False,
                                       [*throughput.TINY_NETWORKS, "--trainer.enable_progress_bar", "true"],
                                       skip=20, learning_starts=args.warmup)
    result = {"tree": str(tree), "warmup_ms_per_env_step": 1e3 / timer.rate("warmup"),
              "learning_ms_per_env_step": 1e3 / timer.rate("learning")}
    print("fit_loop_rate", json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
