"""Published tasks at CPU size beside the DIME paper: DMC cheetah-run to 48k and pendulum-swingup to 96k env steps,
MyoSuite obj-hold (success rate; needs the myo extra) to 96k.

Start the runs, or continue them after an interruption (each a ``python -m dime_lightning.fit`` in the
background, torch on one thread, optionally pinned to a core; a run whose folder holds checkpoints resumes with
``--ckpt_path last`` into the same MLflow run, a FINISHED one is skipped, a running one refuses a second writer):

    python benchmarks/paper_tasks_cpu.py launch cheetah-run:0 pendulum-swingup:0 --cpus 0 1
    python benchmarks/paper_tasks_cpu.py launch cheetah-run:1 --dry_run      # print the fit command only
    python benchmarks/paper_tasks_cpu.py launch pendulum-swingup:0:gaussian  # the Gaussian actor, same machinery
    python benchmarks/paper_tasks_cpu.py launch pendulum-swingup:0:brn-warmup-100k  # one CPU deviation undone

Results, at any time (also while the runs write):

    python benchmarks/paper_tasks_cpu.py report

``report`` writes ``benchmarks/results/paper_tasks_cpu.json`` (``{env id: {seed: [[env_step, eval return], ...]}}``,
straight from the MLflow runs), one ``compare --reference paper`` figure per task
(``benchmarks/results/paper_tasks_cpu_<task>.png``), and prints the BENCHMARKS.md tables: each evaluation beside
the published mean, min–max band and IQM where the paper evaluated at the same env step (on the task's published
metric: the success rate for MyoSuite), with a column per variant (``VARIANTS``) that has runs. Every run uses the
task's paper config with the overlay ``benchmarks/paper_tasks_cpu.yaml``; its deviations are listed in
``DEVIATIONS``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dime_lightning import aggregates, checkpointing, compare, reference, reproduce
from dime_lightning.configs import CONF_DIR
from dime_lightning.small_cli import respell

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs"
RESULTS = ROOT / "benchmarks" / "results"
OVERLAY = ROOT / "benchmarks" / "paper_tasks_cpu.yaml"
TRACKING_URI = f"sqlite:///{RUNS / 'paper_tasks_cpu.db'}"
DEVIATIONS = ("critics 2 × [256, 256] (paper [2048, 2048])", "batch-renorm warm-up 1,000 critic updates (paper "
              "100,000)", "evaluation every 4,000 env steps (paper 24,000; both 5 stochastic episodes)",
              "run length 48k (cheetah-run) and 96k (pendulum-swingup, obj-hold) env steps (paper 1M)",
              "CPU, torch on one thread, losses and acting through torch.compile (the same math)")


@dataclass(frozen=True)
class PaperTask:
    """One published task at CPU size."""

    env_id: str  # the env id, also the MLflow experiment (the fit's default)
    config: str  # the paper config's stem in conf/
    env_steps: int  # this benchmark's budget


TASKS = {"cheetah-run": PaperTask("dm_control/cheetah-run", "dmc_cheetah_run", 48_000),
         "pendulum-swingup": PaperTask("dm_control/pendulum-swingup", "dmc_pendulum_swingup", 96_000),
         "obj-hold": PaperTask("myoHandObjHoldRandom-v0", "myo_hand_obj_hold_random", 96_000)}


@dataclass(frozen=True)
class Variant:
    """One way to run a task: DIME as the overlay sets it, or one change to it with otherwise identical machinery."""

    label: str  # its column and curve name in the report
    configs: tuple[Path, ...] = ()  # overlays after the task's config, before the CPU overlay
    overrides: tuple[str, ...] = ()  # settings after the CPU overlay (``--key value`` pairs)


VARIANTS = {"diffusion": Variant("DIME"),
            "gaussian": Variant("Gaussian actor, same machinery", configs=(CONF_DIR / "gaussian.yaml",)),
            "brn-warmup-100k": Variant("DIME, batch-renorm warm-up 100,000 (the paper's)",
                                       overrides=("--model.critic.init_args.brn_warmup_steps", "100000"))}
RUN_NAME = re.compile(rf"cpu-(?:({'|'.join(map(re.escape, VARIANTS))})-)?seed(\d+)")


def parse_run(spec: str) -> tuple[str, int, str]:
    """``cheetah-run:0`` → (``cheetah-run``, 0, ``diffusion``), ``pendulum-swingup:0:gaussian`` → (…, ``gaussian``);
    ``ValueError`` naming the spec otherwise.

    spec: ``<task>:<seed>[:<variant>]`` with a task of ``TASKS``, a seed >= 0 and a variant of ``VARIANTS``."""
    task, _, rest = spec.partition(":")
    seed, _, variant = rest.partition(":")
    variant = variant or "diffusion"
    if task not in TASKS or not seed.isdigit() or variant not in VARIANTS:
        raise ValueError(f"run {spec!r}: expected <task>:<seed>[:<variant>] with a task in {sorted(TASKS)}, a seed "
                         f">= 0 and a variant in {sorted(VARIANTS)}")
    return task, int(seed), variant


def run_name(seed: int, variant: str = "diffusion") -> str:
    """The MLflow run name of one seed (``cpu-seed0``; ``cpu-gaussian-seed0`` for the variant ``gaussian``).

    seed: the run's seed.
    variant: a key of ``VARIANTS``."""
    return f"cpu-seed{seed}" if variant == "diffusion" else f"cpu-{variant}-seed{seed}"


def parse_run_name(name: str) -> tuple[str, int] | None:
    """(variant, seed) of a run named by ``run_name``; None for any other name."""
    found = RUN_NAME.fullmatch(name or "")
    return (found.group(1) or "diffusion", int(found.group(2))) if found else None


def run_folder(task: str, seed: int, variant: str = "diffusion") -> str:
    """The name of a run's checkpoint folder under the runs folder (its log: the same + ``.log``)."""
    return f"{TASKS[task].config}-{run_name(seed, variant).removeprefix('cpu-')}"


def fit_command(task: str, seed: int, tracking_uri: str = TRACKING_URI, runs: Path = RUNS,
                variant: str = "diffusion") -> list[str]:
    """The fit command of one (task, seed): fresh, or ``--ckpt_path last`` when its folder holds checkpoints.

    task: a key of ``TASKS``.
    seed: the run's seed.
    tracking_uri: MLflow tracking URI of the benchmark's store.
    runs: the folder of the runs' checkpoint folders and logs.
    variant: a key of ``VARIANTS``."""
    spec, chosen = TASKS[task], VARIANTS[variant]
    folder = runs / run_folder(task, seed, variant)
    configs = [arg for path in (CONF_DIR / f"{spec.config}.yaml", *chosen.configs, OVERLAY)
               for arg in ("--config", str(path))]
    command = [sys.executable, "-m", "dime_lightning.fit", *configs, *chosen.overrides,
               "--data.total_env_steps", str(spec.env_steps), "--seed_everything",
               str(seed), "--mlflow.run_name", run_name(seed, variant), "--mlflow.tracking_uri", tracking_uri,
               "--checkpoint.dirpath", str(folder), "--trainer.enable_progress_bar", "false"]
    if folder.is_dir() and checkpointing.folder_checkpoints(folder):
        command += ["--ckpt_path", "last"]
    return command


def launch(specs: list[str], cpus: list[int], dry_run: bool, tracking_uri: str = TRACKING_URI,
           runs: Path = RUNS) -> list[str]:
    """Start (or resume) the runs in the background; returns one line per run saying what was done.

    specs: ``<task>:<seed>[:<variant>]`` strings.
    cpus: cores to pin the runs to, one per run in order (empty: not pinned).
    dry_run: only say what would run.
    tracking_uri: MLflow tracking URI of the benchmark's store.
    runs: the folder of the runs' checkpoint folders and logs."""
    parsed = [parse_run(spec) for spec in specs]
    if cpus and len(cpus) != len(parsed):
        raise ValueError(f"--cpus names {len(cpus)} cores for {len(parsed)} runs; give one per run or none")
    runs.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, ((task, seed, variant), spec) in enumerate(zip(parsed, specs, strict=True)):
        if run_name(seed, variant) in reproduce.finished_run_names(TASKS[task].env_id, tracking_uri):
            lines.append(f"{spec} FINISHED in {tracking_uri}: skipped")
            continue
        command = fit_command(task, seed, tracking_uri, runs, variant)
        log = runs / f"{run_folder(task, seed, variant)}.log"
        if dry_run:
            lines.append(" ".join(command))
            continue
        core = {cpus[index]} if cpus else None
        with log.open("a") as out:
            process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={"MUJOCO_GL": "egl", **os.environ, "OMP_NUM_THREADS": "1"},
                                       preexec_fn=functools.partial(os.sched_setaffinity, 0, core) if core else None)
        resumed = "resumed" if "--ckpt_path" in command else "started"
        lines.append(f"{spec} {resumed}, pid {process.pid}, log {log}")
    return lines


def snapshot(tracking_uri: str, folder: Path) -> str:
    """A consistent copy of an SQLite tracking database (the runs may still be writing to it); other URIs as is.

    tracking_uri: MLflow tracking URI.
    folder: where the copy goes."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return tracking_uri
    source = Path(tracking_uri[len(prefix):])
    if not source.is_file():
        raise compare.CompareError(f"no tracking database at {source}")
    copy = folder / source.name
    with sqlite3.connect(source) as live, sqlite3.connect(copy) as target:
        live.backup(target)
    return f"{prefix}{copy}"


def variant_runs(env_id: str, tracking_uri: str) -> pd.DataFrame:
    """The runs of one task named by ``run_name``, with ``variant`` and ``seed`` columns and ``group`` set to the
    variant's label (``compare`` groups by it); ``compare.CompareError`` when the task has no runs.

    env_id: the task's env id (its MLflow experiment).
    tracking_uri: MLflow tracking URI."""
    runs = compare.find_runs(env_id, tracking_uri, compare.DEFAULT_GROUP)
    parsed = runs["tags.mlflow.runName"].map(parse_run_name)
    runs = runs[parsed.notna()].copy()
    runs["variant"], runs["seed"] = parsed[parsed.notna()].str[0], parsed[parsed.notna()].str[1]
    runs["group"] = runs["variant"].map(lambda variant: VARIANTS[variant].label)
    return runs


def seed_curves(runs: pd.DataFrame, variant: str, tracking_uri: str) -> dict[str, list[list[float]]]:
    """seed → [[env_step, value], ...] of one variant's runs of one task, straight from MLflow, on the task's
    published metric (``eval/return_mean``; ``eval/success_rate`` for MyoSuite).

    runs: ``variant_runs`` of the task.
    variant: a key of ``VARIANTS``.
    tracking_uri: MLflow tracking URI."""
    runs = runs[runs.variant == variant]
    if runs.empty:
        return {}
    histories = compare.metric_histories(runs, reference.published_metric(runs.task.iloc[0]), tracking_uri)
    curves = {}
    for run_id, seed in zip(runs.run_id, runs.seed, strict=True):
        if run_id in histories:
            curves[str(seed)] = [[int(step), float(value)] for step, value in histories[run_id].items()]
    return dict(sorted(curves.items(), key=lambda item: int(item[0])))


def _by_step(curves: dict[str, list[list[float]]]) -> dict[int, list[float]]:
    by_step: dict[int, list[float]] = {}
    for points in curves.values():
        for step, value in points:
            by_step.setdefault(int(step), []).append(value)
    return by_step


def task_rows(task: str, curves: dict[str, list[list[float]]], reps: int,
              others: dict[str, dict[str, list[list[float]]]] | None = None) -> list[dict]:
    """One row per evaluated env step: the seeds' mean beside the published mean, min–max band and IQM (and each
    other variant's mean where it has runs).

    task: a key of ``TASKS``.
    curves: DIME's seed → [[env_step, return], ...] from ``seed_curves``.
    reps: bootstrap replications of the published IQM's confidence interval.
    others: variant key → its ``seed_curves`` (each a column of ``markdown``)."""
    steps, published = reference.reference_seeds(reference.reference_task(TASKS[task].env_id).task)
    by_step = _by_step(curves)
    other = {variant: _by_step(found) for variant, found in (others or {}).items()}
    rows = []
    for step in sorted(by_step.keys() | {s for values in other.values() for s in values}):
        row = {"env_steps": step, "variants": {variant: (len(values[step]), float(np.mean(values[step])))
                                               for variant, values in other.items() if step in values}}
        if step not in by_step:
            rows.append(row)
            continue
        row.update({"seeds": len(by_step[step]), "return_mean": float(np.mean(by_step[step]))})
        if step in steps:
            values = published[list(steps).index(step)]
            interval = aggregates.iqm_ci(values, reps=reps)
            row.update({"paper_mean": float(values.mean()), "paper_min": float(values.min()),
                        "paper_max": float(values.max()), "paper_iqm": interval.point,
                        "paper_iqm_low": interval.low, "paper_iqm_high": interval.high,
                        "in_band": bool(values.min() <= min(by_step[step])
                                        and max(by_step[step]) <= values.max())})
        rows.append(row)
    return rows


def markdown(task: str, rows: list[dict]) -> str:
    """The BENCHMARKS.md table of one task.

    task: a key of ``TASKS``.
    rows: from ``task_rows``."""
    metric = reference.published_metric(TASKS[task].env_id)
    columns = [variant for variant in VARIANTS if any(variant in row["variants"] for row in rows)]
    lines = [f"**{TASKS[task].env_id}** (`{metric}`)", "",
             "| env steps | this: mean over seeds (5 stochastic episodes each) | "
             + "".join(f"{VARIANTS[variant].label} | " for variant in columns)
             + "paper mean (10 seeds) | paper min–max | paper IQM [95 % CI] | inside the band |",
             "|---:|---:|" + "---:|" * len(columns) + "---:|---:|---:|:---:|"]
    digits = 2 if metric == reference.SUCCESS_METRIC else 1
    for row in rows:
        ours = (f"| {row['env_steps']:,} | "
                + (f"{row['return_mean']:.{digits}f} (n={row['seeds']}) |" if "return_mean" in row else "– |"))
        for variant in columns:
            n, mean = row["variants"].get(variant, (0, 0.0))
            ours += f" {mean:.{digits}f} (n={n}) |" if n else " – |"
        if "paper_mean" not in row:
            lines.append(f"{ours} – | – | – | – |")
            continue
        low, high, iqm = row["paper_iqm_low"], row["paper_iqm_high"], row["paper_iqm"]
        lines.append(f"{ours} {row['paper_mean']:.{digits}f} | [{row['paper_min']:.{digits}f}, "
                     f"{row['paper_max']:.{digits}f}] | {iqm:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}] | "
                     f"{'yes' if row['in_band'] else '**no**'} |")
    return "\n".join(lines)


def report(tracking_uri: str = TRACKING_URI, results: Path = RESULTS, reps: int = aggregates.DEFAULT_REPS) -> str:
    """Write the JSONs (``paper_tasks_cpu.json`` for DIME, ``paper_tasks_cpu_<variant>.json`` for each other variant
    with runs) and one figure per task that has runs; returns the markdown tables.

    tracking_uri: MLflow tracking URI of the benchmark's store.
    results: folder of the JSON and PNGs.
    reps: bootstrap replications of the IQM confidence intervals."""
    results.mkdir(parents=True, exist_ok=True)
    data: dict[str, dict] = {variant: {} for variant in VARIANTS}
    tables = []
    with tempfile.TemporaryDirectory() as folder:
        uri = snapshot(tracking_uri, Path(folder))
        for task, spec in TASKS.items():
            try:
                runs = variant_runs(spec.env_id, uri)
            except compare.CompareError as err:  # this task has no runs (yet)
                tables.append(f"**{spec.env_id}**: {err}")
                continue
            curves = {variant: found for variant in VARIANTS if (found := seed_curves(runs, variant, uri))}
            if "diffusion" not in curves:
                tables.append(f"**{spec.env_id}**: no DIME runs")
                continue
            for variant, found in curves.items():
                data[variant][spec.env_id] = found
            compare.compare_runs(runs, spec.env_id, tracking_uri=uri, reference_source="paper", reps=reps,
                                 out=results / f"paper_tasks_cpu_{spec.config}.png")
            others = {variant: found for variant, found in curves.items() if variant != "diffusion"}
            tables.append(markdown(task, task_rows(task, curves["diffusion"], reps, others)))
    for variant, found in data.items():
        if found or variant == "diffusion":
            name = "paper_tasks_cpu.json" if variant == "diffusion" else f"paper_tasks_cpu_{variant}.json"
            (results / name).write_text(json.dumps(found, indent=1) + "\n")
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2 for bad input).

    argv: arguments (default: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("launch", help="start or resume runs in the background")
    start.add_argument("runs", nargs="+", help=f"<task>:<seed>[:<variant>], task in {sorted(TASKS)}, "
                       f"variant in {sorted(VARIANTS)} (default diffusion)")
    start.add_argument("--cpus", type=int, nargs="*", default=[], help="one core per run to pin it to")
    start.add_argument("--dry_run", action="store_true", help="print the fit commands only")
    show = commands.add_parser("report", help="JSON, figures and the markdown tables")
    show.add_argument("--reps", type=int, default=aggregates.DEFAULT_REPS, help="bootstrap replications")
    for sub in (start, show):
        sub.add_argument("--tracking_uri", default=TRACKING_URI, help="the benchmark's MLflow store")
    args = parser.parse_args(respell(sys.argv[1:] if argv is None else argv, ("--dry_run", "--tracking_uri"),
                                     parser.prog))  # the hyphenated spellings of earlier versions, with a note
    try:
        if args.command == "launch":
            print("\n".join(launch(args.runs, args.cpus, args.dry_run, args.tracking_uri)))
        else:
            print(report(args.tracking_uri, reps=args.reps))
            print("\ndeviations from the paper: " + "; ".join(DEVIATIONS))
    except (ValueError, compare.CompareError) as err:
        print(f"paper_tasks_cpu: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
