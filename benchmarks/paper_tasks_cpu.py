"""Published tasks at CPU size beside the DIME paper: DMC cheetah-run to 48k and pendulum-swingup to 96k env steps,
MyoSuite obj-hold (success rate; needs the myo extra) to 96k.

Start the runs, or continue them after an interruption (each a ``python -m dime_lightning.fit`` in the
background, torch on one thread, optionally pinned to a core; a run whose folder holds checkpoints resumes with
``--ckpt_path last`` into the same MLflow run, a FINISHED one is skipped, a running one refuses a second writer):

    python benchmarks/paper_tasks_cpu.py launch cheetah-run:0 pendulum-swingup:0 --cpus 0 1
    python benchmarks/paper_tasks_cpu.py launch cheetah-run:1 --dry-run      # print the fit command only
    python benchmarks/paper_tasks_cpu.py launch pendulum-swingup:0:gaussian  # the Gaussian actor, same machinery

Results, at any time (also while the runs write):

    python benchmarks/paper_tasks_cpu.py report

``report`` writes ``benchmarks/results/paper_tasks_cpu.json`` (``{env id: {seed: [[env_step, eval return], ...]}}``,
straight from the MLflow runs), one ``compare --reference paper`` figure per task
(``benchmarks/results/paper_tasks_cpu_<task>.png``), and prints the BENCHMARKS.md tables: each evaluation beside
the published mean, min–max band and IQM where the paper evaluated at the same env step (on the task's published
metric: the success rate for MyoSuite). Every run uses the task's paper config with the overlay
``benchmarks/paper_tasks_cpu.yaml``; its deviations are listed in ``DEVIATIONS``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dime_lightning import aggregates, checkpointing, compare, reference, reproduce
from dime_lightning.configs import CONF_DIR

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
# the actor of a run: DIME's diffusion actor (the paper's), or the tanh-Gaussian one with identical machinery
ACTORS = {"diffusion": (), "gaussian": (CONF_DIR / "gaussian.yaml",)}


def parse_run(spec: str) -> tuple[str, int, str]:
    """``cheetah-run:0`` → (``cheetah-run``, 0, ``diffusion``), ``pendulum-swingup:0:gaussian`` → (…, ``gaussian``);
    ``ValueError`` naming the spec otherwise.

    spec: ``<task>:<seed>[:<actor>]`` with a task of ``TASKS``, a seed >= 0 and an actor of ``ACTORS``."""
    task, _, rest = spec.partition(":")
    seed, _, actor = rest.partition(":")
    actor = actor or "diffusion"
    if task not in TASKS or not seed.isdigit() or actor not in ACTORS:
        raise ValueError(f"run {spec!r}: expected <task>:<seed>[:<actor>] with a task in {sorted(TASKS)}, a seed "
                         f">= 0 and an actor in {sorted(ACTORS)}")
    return task, int(seed), actor


def run_name(seed: int, actor: str = "diffusion") -> str:
    """The MLflow run name of one seed (``cpu-seed0``; ``cpu-gaussian-seed0`` for the Gaussian actor).

    seed: the run's seed.
    actor: a key of ``ACTORS``."""
    return f"cpu-seed{seed}" if actor == "diffusion" else f"cpu-{actor}-seed{seed}"


def run_folder(task: str, seed: int, actor: str = "diffusion") -> str:
    """The name of a run's checkpoint folder under the runs folder (its log: the same + ``.log``)."""
    return f"{TASKS[task].config}-{run_name(seed, actor).removeprefix('cpu-')}"


def fit_command(task: str, seed: int, tracking_uri: str = TRACKING_URI, runs: Path = RUNS,
                actor: str = "diffusion") -> list[str]:
    """The fit command of one (task, seed): fresh, or ``--ckpt_path last`` when its folder holds checkpoints.

    task: a key of ``TASKS``.
    seed: the run's seed.
    tracking_uri: MLflow tracking URI of the benchmark's store.
    runs: the folder of the runs' checkpoint folders and logs.
    actor: a key of ``ACTORS`` (its overlay comes after the task's config, before the CPU overlay)."""
    spec = TASKS[task]
    folder = runs / run_folder(task, seed, actor)
    configs = [arg for path in (CONF_DIR / f"{spec.config}.yaml", *ACTORS[actor], OVERLAY)
               for arg in ("--config", str(path))]
    command = [sys.executable, "-m", "dime_lightning.fit", *configs,
               "--data.total_env_steps", str(spec.env_steps), "--seed_everything",
               str(seed), "--mlflow.run_name", run_name(seed, actor), "--mlflow.tracking_uri", tracking_uri,
               "--checkpoint.dirpath", str(folder), "--trainer.enable_progress_bar", "false"]
    if folder.is_dir() and checkpointing.folder_checkpoints(folder):
        command += ["--ckpt_path", "last"]
    return command


def launch(specs: list[str], cpus: list[int], dry_run: bool, tracking_uri: str = TRACKING_URI,
           runs: Path = RUNS) -> list[str]:
    """Start (or resume) the runs in the background; returns one line per run saying what was done.

    specs: ``<task>:<seed>[:<actor>]`` strings.
    cpus: cores to pin the runs to, one per run in order (empty: not pinned).
    dry_run: only say what would run.
    tracking_uri: MLflow tracking URI of the benchmark's store.
    runs: the folder of the runs' checkpoint folders and logs."""
    parsed = [parse_run(spec) for spec in specs]
    if cpus and len(cpus) != len(parsed):
        raise ValueError(f"--cpus names {len(cpus)} cores for {len(parsed)} runs; give one per run or none")
    runs.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, ((task, seed, actor), spec) in enumerate(zip(parsed, specs, strict=True)):
        if run_name(seed, actor) in reproduce.finished_run_names(TASKS[task].env_id, tracking_uri):
            lines.append(f"{spec} FINISHED in {tracking_uri}: skipped")
            continue
        command = fit_command(task, seed, tracking_uri, runs, actor)
        log = runs / f"{run_folder(task, seed, actor)}.log"
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


def seed_curves(env_id: str, tracking_uri: str, group: str = "DIME") -> dict[str, list[list[float]]]:
    """seed → [[env_step, value], ...] of one actor's runs of one task, straight from MLflow, on the task's
    published metric (``eval/return_mean``; ``eval/success_rate`` for MyoSuite).

    env_id: the task's env id (its MLflow experiment).
    tracking_uri: MLflow tracking URI.
    group: the actor, as ``compare`` labels it (``DIME`` or ``Gaussian``)."""
    runs = compare.find_runs(env_id, tracking_uri, compare.DEFAULT_GROUP)
    runs = runs[runs.group == group]
    if runs.empty:
        return {}
    histories = compare.metric_histories(runs, reference.published_metric(env_id), tracking_uri)
    curves = {}
    for run_id, seed in zip(runs.run_id, runs["params.seed_everything"], strict=True):
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
              gaussian: dict[str, list[list[float]]] | None = None) -> list[dict]:
    """One row per evaluated env step: the seeds' mean beside the published mean, min–max band and IQM (and the
    Gaussian actor's mean where it has runs).

    task: a key of ``TASKS``.
    curves: seed → [[env_step, return], ...] from ``seed_curves``.
    reps: bootstrap replications of the published IQM's confidence interval.
    gaussian: the Gaussian actor's ``seed_curves`` (none: no column)."""
    steps, published = reference.reference_seeds(reference.reference_task(TASKS[task].env_id).task)
    by_step, other = _by_step(curves), _by_step(gaussian or {})
    rows = []
    for step in sorted(by_step.keys() | other.keys()):
        row = {"env_steps": step}
        if step in other:
            row.update({"gaussian_seeds": len(other[step]), "gaussian_mean": float(np.mean(other[step]))})
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
    gaussian = any("gaussian_mean" in row for row in rows)
    lines = [f"**{TASKS[task].env_id}** (`{metric}`)", "",
             "| env steps | this: mean over seeds (5 stochastic episodes each) | "
             + ("Gaussian actor, same machinery | " if gaussian else "")
             + "paper mean (10 seeds) | paper min–max | paper IQM [95 % CI] | inside the band |",
             "|---:|---:|" + ("---:|" if gaussian else "") + "---:|---:|---:|:---:|"]
    digits = 2 if metric == reference.SUCCESS_METRIC else 1
    for row in rows:
        ours = (f"| {row['env_steps']:,} | "
                + (f"{row['return_mean']:.{digits}f} (n={row['seeds']}) |" if "return_mean" in row else "– |"))
        if gaussian:
            ours += (f" {row['gaussian_mean']:.{digits}f} (n={row['gaussian_seeds']}) |" if "gaussian_mean" in row
                     else " – |")
        if "paper_mean" not in row:
            lines.append(f"{ours} – | – | – | – |")
            continue
        low, high, iqm = row["paper_iqm_low"], row["paper_iqm_high"], row["paper_iqm"]
        lines.append(f"{ours} {row['paper_mean']:.{digits}f} | [{row['paper_min']:.{digits}f}, "
                     f"{row['paper_max']:.{digits}f}] | {iqm:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}] | "
                     f"{'yes' if row['in_band'] else '**no**'} |")
    return "\n".join(lines)


def report(tracking_uri: str = TRACKING_URI, results: Path = RESULTS, reps: int = aggregates.DEFAULT_REPS) -> str:
    """Write the JSON and one figure per task that has runs; returns the markdown tables.

    tracking_uri: MLflow tracking URI of the benchmark's store.
    results: folder of the JSON and PNGs.
    reps: bootstrap replications of the IQM confidence intervals."""
    results.mkdir(parents=True, exist_ok=True)
    data, gaussian, tables = {}, {}, []
    with tempfile.TemporaryDirectory() as folder:
        uri = snapshot(tracking_uri, Path(folder))
        for task, spec in TASKS.items():
            try:
                data[spec.env_id] = seed_curves(spec.env_id, uri)
            except compare.CompareError as err:  # this task has no runs (yet)
                tables.append(f"**{spec.env_id}**: {err}")
                continue
            if not data[spec.env_id]:
                del data[spec.env_id]
                tables.append(f"**{spec.env_id}**: no DIME runs")
                continue
            if found := seed_curves(spec.env_id, uri, "Gaussian"):
                gaussian[spec.env_id] = found
            compare.compare(spec.env_id, tracking_uri=uri, out=results / f"paper_tasks_cpu_{spec.config}.png",
                            reference_source="paper", reps=reps)
            tables.append(markdown(task, task_rows(task, data[spec.env_id], reps, gaussian.get(spec.env_id))))
    (results / "paper_tasks_cpu.json").write_text(json.dumps(data, indent=1) + "\n")
    if gaussian:
        (results / "paper_tasks_cpu_gaussian.json").write_text(json.dumps(gaussian, indent=1) + "\n")
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2 for bad input).

    argv: arguments (default: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("launch", help="start or resume runs in the background")
    start.add_argument("runs", nargs="+", help=f"<task>:<seed>[:<actor>], task in {sorted(TASKS)}, "
                       f"actor in {sorted(ACTORS)} (default diffusion)")
    start.add_argument("--cpus", type=int, nargs="*", default=[], help="one core per run to pin it to")
    start.add_argument("--dry-run", action="store_true", help="print the fit commands only")
    show = commands.add_parser("report", help="JSON, figures and the markdown tables")
    show.add_argument("--reps", type=int, default=aggregates.DEFAULT_REPS, help="bootstrap replications")
    for sub in (start, show):
        sub.add_argument("--tracking-uri", default=TRACKING_URI, help="the benchmark's MLflow store")
    args = parser.parse_args(argv)
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
