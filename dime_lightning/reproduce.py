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

On a SLURM cluster (the ``slurm`` extra, from a login node; the store an ``mlflow server``):

    python -m dime_lightning.reproduce --tasks all-dmc --seeds 10 --launcher slurm --tracking_uri http://HOST:5000 \
        --slurm_partition gpu --slurm_gpus 1 --slurm_cpus 8 --slurm_time 240 -- --trainer.accelerator gpu
    python -m dime_lightning.reproduce --tasks all-dmc --seeds 10 --tracking_uri http://HOST:5000 --status

Each (task, seed) is one job named ``<task>-seed<seed>``; the command prints the job ids and returns (``--wait``:
it waits, reports and compares). A job that reaches its time limit, is preempted or requeued writes its
checkpoint and resumes from it into the same MLflow run (``dime_lightning.slurm``). Running the command again
submits only runs that are neither FINISHED nor queued or running (job ids in ``<workdir>/slurm_jobs.json``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, Namespace

from dime_lightning import compare, reference, slurm
from dime_lightning.checkpointing import folder_checkpoints
from dime_lightning.configs import CONF_DIR, check_moved_keys, resolve_config_path
from dime_lightning.envs import EnvIdError, check_env_id
from dime_lightning.errors import BadInputError, ReproduceError
from dime_lightning.runs import resolve_tracking_uri
from dime_lightning.small_cli import make_parser, parse

ALL_DMC = "all-dmc"
GROUPS = {"all": ("",), ALL_DMC: ("dmc_",), "all-gym": ("ant", "humanoid"), "all-myo": ("myo_",)}  # stem prefixes
DEFAULT_EXPERIMENT = "dime-reproduce"


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


def run_summaries(experiment: str, tracking_uri: str, metrics: dict[str, str]) -> dict[str, tuple[str, int, float]]:
    """Run name → (MLflow status, env steps of its last evaluation, that evaluation) of the newest run per name.

    experiment: MLflow experiment name.
    tracking_uri: MLflow tracking URI.
    metrics: run name → the evaluation metric to read (a run without one gets ``eval/return_mean``)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    summaries = {}
    for run in client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]):
        name = run.info.run_name
        history = client.get_metric_history(run.info.run_id, metrics.get(name, reference.RETURN_METRIC))
        last = max(history, key=lambda m: m.step) if history else None
        summaries[name] = (run.info.status, last.step if last else 0, last.value if last else float("nan"))
    return summaries


def _run(name: str, command: list[str], log: Path, threads: int) -> tuple[str, int, float]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    minutes = (time.perf_counter() - started) / 60.0
    print(f"{name}: exit {code} after {minutes:.1f} min (log: {log})", flush=True)
    return name, code, minutes


RENAMED = ("--first_seed", "--tracking_uri", "--dry_run", *slurm.OPTIONS)  # hyphenated in earlier releases


def _parser() -> ArgumentParser:
    parser = make_parser("dime_lightning.reproduce", __doc__)
    parser.add_argument("--tasks", nargs="+", required=True,
                        help=f"config stems, env ids, YAML files or {', '.join(GROUPS)}")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per task (the paper: 10)")
    parser.add_argument("--first_seed", type=int, default=0)
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="local: fit processes on this machine; slurm: one SLURM job per task and seed")
    parser.add_argument("--parallel", type=int, default=1, help="local: fit processes side by side")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    parser.add_argument("--tracking_uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
                        "(slurm: an http(s):// mlflow server every node reaches)")
    parser.add_argument("--workdir", type=Path, default=Path("reproduce_runs"))
    parser.add_argument("--overlay", type=Path, nargs="*", default=[], help="configs after each task's config")
    parser.add_argument("--reference", choices=[*sorted(reference.SOURCES), "none"], default="paper")
    parser.add_argument("--reps", type=int, default=5000, help="bootstrap replications of the comparison")
    parser.add_argument("--dry_run", action="store_true", help="print the fit commands and stop")
    parser.add_argument("--status", action="store_true", help="report each run's SLURM and MLflow state and stop")
    parser.add_argument("--wait", action="store_true", help="slurm: after submitting, wait until every job has "
                        "left the queue, report, and compare")
    parser.add_argument("--poll", type=float, default=30.0, help="slurm: seconds between queue checks of --wait")
    slurm.add_arguments(parser)
    return parser


def _check_slurm(args: Namespace, uri: str) -> slurm.SlurmOptions:
    options = slurm.options_from_args(args)
    options.check()
    if not uri.startswith(("http://", "https://")):
        raise ReproduceError(f"--launcher slurm needs an MLflow tracking server every job reaches (--tracking_uri "
                             f"http://HOST:PORT, from `mlflow server --backend-store-uri postgresql://...`), not "
                             f"{uri!r}: hundreds of jobs must not write one file store on a shared file system")
    slurm.check_programs()
    from dime_lightning.tracking import TrackingError, check_tracking_uri  # imports Lightning: only when needed

    try:
        check_tracking_uri(uri)
    except TrackingError as err:
        raise ReproduceError(str(err)) from err
    return options


def _report(names: list[str], metrics: dict[str, str], args: Namespace, uri: str) -> dict[str, str]:
    """Print one line per run (SLURM job and state when submitted from the workdir, MLflow state, last
    evaluation); returns run name → MLflow status."""
    registry = {k: v for k, v in slurm.read_registry(args.workdir).items() if k in names}
    queued = slurm.queued_states(list(registry.values())) if registry and shutil.which("squeue") else {}
    summaries = run_summaries(args.experiment, uri, metrics)
    print(f"{'run':<40} {'job':>8} {'SLURM':<12} {'MLflow':<9} {'env steps':>9}  last eval")
    for name in names:
        job = registry.get(name, "-")
        state = queued.get(job) or (slurm.final_state(job) if job != "-" and shutil.which("scontrol") else "-")
        status, steps, value = summaries.get(name, ("-", 0, float("nan")))
        print(f"{name:<40} {job:>8} {state:<12} {status:<9} {steps:>9}  {value:.4g}  ({metrics[name]})")
    return {name: summaries.get(name, ("-",))[0] for name in names}


def _compare(args: Namespace, uri: str, source: str) -> int:
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
    return 0


def _launch_slurm(plan: list[tuple[str, list[str]]], options: slurm.SlurmOptions, args: Namespace) -> None:
    registry = slurm.read_registry(args.workdir)
    queued = slurm.queued_states([registry[name] for name, _ in plan if name in registry])
    jobs = []
    for name, command in plan:
        if registry.get(name) in queued:
            print(f"{name}: SLURM job {registry[name]} is {queued[registry[name]]}, not resubmitted")
            continue
        job = slurm.FitJob(command, args.workdir / name, args.workdir / f"{name}.log", options.cpus,
                           stop_timeout_s=max(10, options.signal_delay_s - 30))
        jobs.append((name, job))
    print(f"{len(jobs)} jobs to submit into experiment {args.experiment!r}", flush=True)
    registry.update(slurm.submit(jobs, options, args.workdir))
    if args.wait:
        ids = [registry[name] for name, _ in plan if name in registry]
        while slurm.queued_states(ids):
            time.sleep(args.poll)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns 0 when every run and the comparison succeeded (slurm without ``--wait``: when
    every job was submitted), 1 if a run failed, 2 for bad input.

    argv: arguments (default: ``sys.argv[1:]``); those after ``--`` go to every fit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = parse(_parser(), argv, RENAMED)
    uri = resolve_tracking_uri(args.tracking_uri)
    source = None if args.reference == "none" else args.reference
    try:
        if args.seeds < 1 or args.parallel < 1 or args.reps < 1 or args.poll <= 0:
            raise ReproduceError(f"--seeds, --parallel and --reps must be >= 1 and --poll > 0, got {args.seeds}, "
                                 f"{args.parallel}, {args.reps}, {args.poll}")
        args.overlay = [Path(resolve_config_path(str(p))).resolve() for p in args.overlay]  # conf/<name>: packaged
        args.workdir = args.workdir.resolve()  # jobs may start in another folder
        missing = [str(p) for p in args.overlay if not p.is_file()]
        if missing:
            raise ReproduceError(f"overlay config not found: {missing}")
        tasks = resolve_tasks(args.tasks)
        check_tasks(tasks, source)
        options = _check_slurm(args, uri) if args.launcher == "slurm" and not (args.dry_run or args.status) else None
        for task in tasks:  # a moved key in an overlay or the fit arguments: named before any run starts
            check_moved_keys(fit_command(task, args.first_seed, args.overlay, args.experiment, uri, args.workdir,
                                         extra))
        if args.wait and args.launcher != "slurm":
            raise ReproduceError("--wait is for --launcher slurm (the local launcher always waits)")
    except (BadInputError, slurm.SlurmError) as err:
        sys.stderr.write(f"dime_lightning.reproduce: error: {err}\n")
        return 2
    runs = [(task, seed, f"{task.name}-seed{seed}") for task in tasks
            for seed in range(args.first_seed, args.first_seed + args.seeds)]
    metrics = {name: reference.published_metric(task.env_id) for task, _, name in runs}
    if args.status:
        try:
            statuses = _report([name for _, _, name in runs], metrics, args, uri)
        except slurm.SlurmError as err:
            sys.stderr.write(f"dime_lightning.reproduce: error: {err}\n")
            return 2
        return 0 if all(status == "FINISHED" for status in statuses.values()) else 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    done = set() if args.dry_run else finished_run_names(args.experiment, uri)
    plan = []
    for task, seed, name in runs:
        command = fit_command(task, seed, args.overlay, args.experiment, uri, args.workdir, extra)
        if args.launcher == "local" and folder_checkpoints(args.workdir / name):
            command += ["--ckpt_path", "last"]  # an earlier attempt stopped: continue it, never start over
        if args.dry_run:
            print(" ".join(command))
        elif name in done:
            print(f"{name}: already FINISHED in {args.experiment!r}, skipped")
        else:
            plan.append((name, command))
    if args.dry_run:
        return 0
    if options is not None:
        try:
            _launch_slurm(plan, options, args)
        except slurm.SlurmError as err:
            sys.stderr.write(f"dime_lightning.reproduce: error: {err}\n")
            return 1
        if not args.wait:
            print(f"submitted; `python -m dime_lightning.reproduce {' '.join(argv)} --status` reports on them")
            return 0
        statuses = _report([name for _, _, name in runs], metrics, args, uri)
        failed = [name for name, status in statuses.items() if status != "FINISHED"]
    else:
        threads = max(1, (os.cpu_count() or 1) // args.parallel)
        print(f"{len(plan)} runs, {args.parallel} at a time, into experiment {args.experiment!r} at {uri}",
              flush=True)
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            results = list(pool.map(lambda job: _run(*job, args.workdir / f"{job[0]}.log", threads), plan))
        failed = [name for name, code, _ in results if code != 0]
    code = _compare(args, uri, source) if source else 0
    if failed:
        sys.stderr.write(f"dime_lightning.reproduce: runs not FINISHED (see their logs in {args.workdir}): {failed}\n")
    return 1 if failed or code else 0


if __name__ == "__main__":
    raise SystemExit(main())
