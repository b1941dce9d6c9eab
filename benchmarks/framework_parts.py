"""The framework's cost per env step, part by part, in the real fit loop at tiny sizes (``throughput.py``).

The fit runs on Pendulum-v1 with the dispatch-size networks (1 diffusion step, widths 8, batch 8), evaluation,
checkpoints and artifacts off, MLflow on a SQLite file. Each part is timed by wrapping the method that does it
(wall clock, summed, divided by the env steps of the phase), in two phases: the random warm-up (no update, no
actor) and the learning phase (the first ``skip`` learning steps, which compile, left out).

- ``collector``: stepping the env with the collection policy (``InProcessCollector.steps``; the acting inside
  it is also timed on its own as ``acting``), ``buffer_write``: ``ReplayRing.add``, ``sample``:
  ``ReplayRing.sample`` (the utd × B transitions), ``data_other``: the rest of the data module's env step
  (counters, episode records, the warm-up flag, the finiteness check);
- ``update``: the updater (``DIMEUpdater.__call__``), ``logging``: the module's metrics at logging steps;
- ``callbacks``: DIME's callbacks' per-batch hooks (evaluation, monitor, run info, checkpoint, progress bar);
- ``lightning``: everything else of the env step (Lightning's loop, hooks and logger connector);
- ``framework``: the env step minus the update and the acting: what the framework costs around the algorithm.

    python benchmarks/throughput.py --only framework
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from dime_lightning import callbacks, checkpointing, collection, data, module, replay, tracking, update

PARTS = {  # part: (owner, method)
    "collector": [(collection.InProcessCollector, "steps"), (collection.BatchCollector, "steps")],
    "acting": [(module.DIMEModule, "act")],
    "buffer_write": [(replay.ReplayRing, "add")],
    "sample": [(replay.ReplayRing, "sample")],
    "data_step": [(data.ReplayDataModule, "next_step")],
    "update": [(update.DIMEUpdater, "__call__")],
    "logging": [(module.DIMEModule, "_log_update")],
    "callbacks": [(cls, "on_train_batch_end") for cls in (callbacks.Evaluation, callbacks.TrainingMonitor,
                                                          callbacks.EnvStepProgressBar, tracking.MLflowRunInfo,
                                                          checkpointing.EnvStepCheckpoint)],
}


@contextmanager
def timed_parts(totals: dict[str, float]):
    """Wrap every part's methods so that their wall time adds up in ``totals`` (restored on exit)."""
    saved = []
    for part, methods in PARTS.items():
        for owner, name in methods:
            original = owner.__dict__.get(name) or getattr(owner, name)

            def timed(*args, _original=original, _part=part, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    totals[_part] += time.perf_counter() - start

            saved.append((owner, name, owner.__dict__.get(name)))
            setattr(owner, name, functools.wraps(original)(timed))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


class PhaseSnapshots(Callback):
    """Copies of the running totals (and the clock) at the env steps that open and close each phase."""

    def __init__(self, totals: dict[str, float], marks: dict[str, int]) -> None:
        self.totals, self.marks, self.snapshots = totals, marks, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, at in self.marks.items():
            if pl_module.env_steps == at:
                self.snapshots[name] = (dict(self.totals), time.perf_counter())


def per_env_step(snapshots: dict, start: str, end: str, steps: int) -> dict[str, float]:
    (before, t0), (after, t1) = snapshots[start], snapshots[end]
    ms = {part: (after.get(part, 0.0) - before.get(part, 0.0)) / steps * 1e3 for part in PARTS}
    ms["total"] = (t1 - t0) / steps * 1e3
    ms["data_other"] = ms.pop("data_step") - ms["collector"] - ms["buffer_write"] - ms["sample"]
    ms["lightning"] = ms["total"] - sum(ms[p] for p in ("collector", "buffer_write", "sample", "data_other",
                                                          "update", "logging", "callbacks"))
    ms["framework"] = ms["total"] - ms["update"] - ms["acting"]
    return ms


def framework(fit_loop, workdir: Path, networks: list[str], warmup: int, learning: int, skip: int = 20,
              progress_bar: bool = False) -> dict[str, dict[str, float]]:
    """ms per env step of every part in the warm-up and the learning phase (``fit_loop``: throughput.py's)."""
    totals: dict[str, float] = defaultdict(float)
    marks = {"warmup_start": 50, "warmup_end": warmup, "learning_start": warmup + skip,
             "learning_end": warmup + skip + learning}
    snapshots = PhaseSnapshots(totals, marks)
    with timed_parts(totals):
        fit_loop(learning, workdir, False, [*networks, "--trainer.enable_progress_bar", str(progress_bar).lower()],
                 skip=skip, learning_starts=warmup, callbacks=[snapshots])
    shots = snapshots.snapshots
    return {"warmup": per_env_step(shots, "warmup_start", "warmup_end", warmup - 50),
            "learning": per_env_step(shots, "learning_start", "learning_end", learning)}
