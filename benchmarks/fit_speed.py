"""Env steps/s of the real fit loop (CLI → Lightning → collector → buffer → update), warm-up vs learning phase.

    python benchmarks/fit_speed.py --seconds 120 --out fit.json -- --config conf/ant.yaml --trainer.accelerator gpu

With no speed flags the fit runs with the defaults a user gets (``auto``: dime_lightning.auto); the JSON records the
modes they resolved to. Everything after ``--`` goes to ``dime_lightning.fit`` unchanged (evaluation and checkpoints
are pushed out of the measured window, MLflow is off unless the arguments turn it on). The fit stops ``--seconds``
after the learning phase's first ``--skip`` steps (compilation, CUDA-graph capture), or at ``data.total_env_steps``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

QUIET = ["--eval.every_env_steps", "100000000", "--checkpoint.every_env_steps", "100000000",
         "--checkpoint.save_buffer", "false", "--checkpoint.log_artifacts", "false", "--mlflow.enabled", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


class TimedPhases(Callback):
    """Marks (env steps, time) at the warm-up's start and end and in the learning phase; stops the fit
    ``seconds`` after the learning phase's ``skip``-th step."""

    def __init__(self, learning_starts: int, skip: int, seconds: float) -> None:
        self.learning_starts, self.skip, self.seconds = learning_starts, skip, seconds
        self.marks: dict[str, tuple[int, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps, now = pl_module.env_steps, time.perf_counter()
        if steps == 1:
            self.marks["warmup_start"] = (steps, now)
        if steps == self.learning_starts:
            self.marks["warmup_end"] = (steps, now)
        if steps == self.learning_starts + 1:
            self.marks["first_learning_step"] = (steps, now)
        if steps == self.learning_starts + self.skip:
            self.marks["learning_start"] = (steps, now)
        if "learning_start" in self.marks:
            self.marks["learning_end"] = (steps, now)
            if now - self.marks["learning_start"][1] >= self.seconds:
                trainer.should_stop = True

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for phase in ("warmup", "learning"):
            if f"{phase}_start" in self.marks and f"{phase}_end" in self.marks:
                (s0, t0), (s1, t1) = self.marks[f"{phase}_start"], self.marks[f"{phase}_end"]
                out[f"{phase}_env_steps"] = s1 - s0
                out[f"{phase}_env_steps_per_s"] = (s1 - s0) / max(t1 - t0, 1e-9)
                out[f"{phase}_ms_per_env_step"] = (t1 - t0) / max(s1 - s0, 1) * 1e3
        if "first_learning_step" in self.marks and "learning_start" in self.marks:
            out["compile_and_capture_s"] = self.marks["learning_start"][1] - self.marks["first_learning_step"][1]
        return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, fit_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="measured learning time")
    parser.add_argument("--skip", type=int, default=10, help="learning steps left out (compile, capture)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(ours)
    from dime_lightning import host_memory
    from dime_lightning.fit import build_cli

    with tempfile.TemporaryDirectory() as workdir:
        cli = build_cli([*fit_args, *QUIET, "--checkpoint.dirpath", str(Path(workdir) / "ckpt")])
        host_memory.apply(cli.config["host_memory"])  # as fit.main does
        learning_starts = cli.datamodule.hparams.learning_starts
        timer = TimedPhases(learning_starts, args.skip, args.seconds)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    result = {"args": fit_args, "device": str(cli.model.device), "learning_starts": learning_starts,
              "env_steps": cli.model.env_steps, "critic_updates": cli.model.critic_updates,
              "compile_update": cli.model.modes["compile"],  # as run: "auto" resolved, after any self-check fall-back
              "modes": {**cli.model.modes, "storage": cli.datamodule.storage}, **timer.summary()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("fit_speed", json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
