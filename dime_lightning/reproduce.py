"""Reproduce the paper: N seeds of a list of tasks into one MLflow experiment, then the comparison against the
published curves (IQM with stratified-bootstrap 95 % CIs, per task and over the DMC tasks).

    python -m dime_lightning.reproduce --tasks all --seeds 10 --parallel 4 -- --trainer.accelerator gpu
    python -m dime_lightning.reproduce --tasks all-dmc --seeds 10 --parallel 4 -- --trainer.accelerator gpu
    python -m dime_lightning.reproduce --tasks dmc_pendulum_swingup dmc_cheetah_run --seeds 3
    python -m dime_lightning.reproduce --tasks dm_control/pendulum-swingup --seeds 1 --overlay conf/smoke.yaml

A task is a config stem of the packaged ``conf/`` (``dmc_cheetah_run``, ``ant``), an env id whose config is there
(``dm_control/cheetah-run``), a YAML path, or a group: ``all`` (every published task: the 15 DMC, Ant,
Humanoid and the 4 MyoSuite hand tasks, 21 in all), ``all-dmc`` (the 15 DMC tasks), ``all-gym`` (Ant, Humanoid)
or ``all-myo`` (the MyoSuite tasks, read on their success rate). Each
(task, seed) is one ``python -m dime_lightning.fit`` process named ``<task>-seed<seed>`` in the experiment
(``--experiment``, default ``dime-reproduce``), with its log and checkpoints under ``--workdir``; ``--parallel
K`` runs K of them side by side (each with ``OMP_NUM_THREADS`` = cores / K unless set). A run whose name is
already FINISHED in the experiment is skipped, so the same command continues an interrupted reproduction.
Arguments after ``--`` go to every fit. At the end: ``compare --reference paper`` on the experiment, written to
``<workdir>/compare.png`` and ``compare.csv``. Unknown tasks, tasks without a published reference and a missing
dm_control or myosuite stop the command before any run starts (exit 2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from dime_lightning import compare, reference
from dime_lightning.checkpointing import folder_checkpoints
from dime_lightning.configs import CONF_DIR, resolve_config_path
from dime_lightning.envs import EnvIdError, check_env_id

ALL_DMC = "all-dmc"
GROUPS = {"all": ("",), ALL_DMC: ("dmc_",), "all-gym": ("ant", "humanoid"), "all-myo": ("myo_",)}  # stem prefixes
DEFAULT_EXPERIMENT = "dime-reproduce"


class ReproduceError(ValueError):
    """A task, seed count or reference that cannot be run; the message names it and lists what exists."""


@dataclass(frozen=True)
class Task:
    """One task to reproduce: its name, config file and env id."""

    name: str
    config: Path
    env_id: str


def _env_id(config: Path) -> str:
    env_id = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("env_id")
    if not env_id:
        raise ReproduceError(f"config {config} has no data.env_id")
    return env_id


def published_configs(prefixes: tuple[str, ...] = ("",), conf: Path = CONF_DIR) -> list[Path]:
    """The task configs in ``conf`` whose stem starts with one of ``prefixes`` and that have a published reference.

    prefixes: config-stem prefixes (``("",)``: every config).
    conf: the config folder."""
    found = []
    for path in sorted(conf.glob("*.yaml")):
        env_id = (yaml.safe_load(path.read_text()) or {}).get("data", {}).get("env_id")
        if not env_id or not path.stem.startswith(prefixes):
            continue
        try:
            reference.reference_task(env_id)
        except reference.ReferenceDataError:
            continue
        found.append(path)
    return found


def resolve_tasks(names: list[str], conf: Path = CONF_DIR) -> list[Task]:
    """Tasks for config stems, env ids, YAML paths or a group of ``GROUPS``; ``ReproduceError`` for an unknown name.

    names: the ``--tasks`` values.
    conf: the config folder."""
    configs = {p.stem: p for p in sorted(conf.glob("*.yaml")) if p.stem not in ("smoke", "gaussian")}
    by_env = {}
    for path in configs.values():
        env_id = (yaml.safe_load(path.read_text()) or {}).get("data", {}).get("env_id")
        if env_id:
            by_env.setdefault(env_id, path)
    paths = []
    for name in names:
        if name in GROUPS:
            paths.extend(published_configs(GROUPS[name], conf))
        elif name in configs:
            paths.append(configs[name])
        elif name in by_env:
            paths.append(by_env[name])
        elif name.endswith((".yaml", ".yml")) and (found := Path(resolve_config_path(name))).is_file():
            paths.append(found.resolve())
        else:
            raise ReproduceError(f"unknown task {name!r}; known: {', '.join(GROUPS)}, {sorted(configs)} or their env "
                                 "ids or a YAML file")
    unique = list(dict.fromkeys(paths))
    return [Task(p.stem, p, _env_id(p)) for p in unique]


def check_tasks(tasks: list[Task], reference_source: str | None) -> None:
    """Fail before any run: env ids that cannot be built (e.g. dm_control missing) or have no reference.

    tasks: resolved tasks.
    reference_source: ``paper``, or None for no comparison."""
    for task in tasks:
        try:
            check_env_id(task.env_id)
        except EnvIdError as err:
            raise ReproduceError(f"task {task.name}: {err}") from err
        if reference_source:
            try:
                reference.reference_task(task.env_id, reference_source)
            except reference.ReferenceDataError as err:
                raise ReproduceError(f"task {task.name}: {err} (use --reference none to run it anyway)") from err


def finished_run_names(experiment: str, tracking_uri: str) -> set[str]:
    """Names of the FINISHED runs of ``experiment`` (empty when it does not exist yet).

    experiment: MLflow experiment name.
    tracking_uri: MLflow tracking URI."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return set()
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'")
    return {run.info.run_name for run in runs}


def fit_command(task: Task, seed: int, overlays: list[Path], experiment: str, tracking_uri: str, workdir: Path,
                extra: list[str]) -> list[str]:
    """The fit command line of one (task, seed).

    task: the task.
    seed: ``seed_everything``.
    overlays: config files applied after the task's config.
    experiment: MLflow experiment name.
    tracking_uri: MLflow tracking URI.
    workdir: folder for checkpoints.
    extra: further fit arguments."""
    configs = [arg for path in (task.config, *overlays) for arg in ("--config", str(path))]
    name = f"{task.name}-seed{seed}"
    return [sys.executable, "-m", "dime_lightning.fit", *configs, "--seed_everything", str(seed),
            "--mlflow.tracking_uri", tracking_uri, "--mlflow.experiment_name", experiment, "--mlflow.run_name", name,
            "--checkpoint.dirpath", str(workdir / name), "--trainer.enable_progress_bar", "false", *extra]


def _run(name: str, command: list[str], log: Path, threads: int) -> tuple[str, int, float]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    minutes = (time.perf_counter() - started) / 60.0
    print(f"{name}: exit {code} after {minutes:.1f} min (log: {log})", flush=True)
    return name, code, minutes


def main(argv: list[str] | None = None) -> int:
    """The command line; returns 0 when every run and the comparison succeeded, 1 if a run failed, 2 for bad input.

    argv: arguments (default: ``sys.argv[1:]``); those after ``--`` go to every fit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m dime_lightning.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", required=True,
                        help=f"config stems, env ids, YAML files or {', '.join(GROUPS)}")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per task (the paper: 10)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=1, help="fit processes side by side")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--workdir", type=Path, default=Path("reproduce_runs"))
    parser.add_argument("--overlay", type=Path, nargs="*", default=[], help="configs after each task's config")
    parser.add_argument("--reference", choices=[*sorted(reference.SOURCES), "none"], default="paper")
    parser.add_argument("--reps", type=int, default=5000, help="bootstrap replications of the comparison")
    parser.add_argument("--dry-run", action="store_true", help="print the fit commands and stop")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or compare.DEFAULT_TRACKING_URI
    source = None if args.reference == "none" else args.reference
    try:
        if args.seeds < 1 or args.parallel < 1 or args.reps < 1:
            raise ReproduceError(f"--seeds, --parallel and --reps must be >= 1, got {args.seeds}, {args.parallel}, "
                                 f"{args.reps}")
        args.overlay = [Path(resolve_config_path(str(p))) for p in args.overlay]  # conf/<name>: packaged if not here
        missing = [str(p) for p in args.overlay if not p.is_file()]
        if missing:
            raise ReproduceError(f"overlay config not found: {missing}")
        tasks = resolve_tasks(args.tasks)
        check_tasks(tasks, source)
    except ReproduceError as err:
        sys.stderr.write(f"dime_lightning.reproduce: error: {err}\n")
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    done = set() if args.dry_run else finished_run_names(args.experiment, uri)
    jobs = []
    for task in tasks:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            name = f"{task.name}-seed{seed}"
            command = fit_command(task, seed, args.overlay, args.experiment, uri, args.workdir, extra)
            if (args.workdir / name).is_dir() and folder_checkpoints(args.workdir / name):
                command += ["--ckpt_path", "last"]  # an earlier attempt stopped: continue it, never start over
            if args.dry_run:
                print(" ".join(command))
            elif name in done:
                print(f"{name}: already FINISHED in {args.experiment!r}, skipped")
            else:
                jobs.append((name, command, args.workdir / f"{name}.log"))
    if args.dry_run:
        return 0
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    print(f"{len(jobs)} runs, {args.parallel} at a time, into experiment {args.experiment!r} at {uri}", flush=True)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda job: _run(*job, threads), jobs))
    failed = [name for name, code, _ in results if code != 0]
    if source is None:
        return 1 if failed else 0
    out = args.workdir / "compare.png"
    try:
        _, table, _ = compare.compare(args.experiment, tracking_uri=uri, out=out, reference_source=source,
                                      reps=args.reps)
    except compare.CompareError as err:
        sys.stderr.write(f"dime_lightning.reproduce: comparison: {err}\n")
        return 1
    table.to_csv(args.workdir / "compare.csv")
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out} and {args.workdir / 'compare.csv'}")
    if failed:
        sys.stderr.write(f"dime_lightning.reproduce: failed runs (see their logs): {failed}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
