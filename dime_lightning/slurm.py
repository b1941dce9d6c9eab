"""Reproductions on a SLURM cluster through submitit: one job per (task, seed), safe under preemption and time
limits.

Each job (``FitJob``) runs ``python -m dime_lightning.fit`` as a child process and waits for it:
- time limit: SLURM sends SIGUSR2 ``--slurm_signal_delay`` seconds before the limit; submitit calls
  ``FitJob.checkpoint``, which sends the fit SIGTERM (it writes its checkpoint and exits) and hands the job back
  to submitit, which requeues it (``scontrol requeue``) at most ``--slurm_max_requeues`` times;
- preemption, ``scontrol requeue``: SLURM sends SIGTERM to the job's processes; the fit writes its checkpoint
  and exits, and SLURM requeues the job (the wrapper ignores SIGTERM, as submitit sets it up);
- every attempt whose checkpoint folder holds checkpoints adds ``--ckpt_path last``: the fit continues the same
  MLflow run from its newest checkpoint;
- any other exit of the fit (an error, a non-finite loss, a full disk) ends the job FAILED, not requeued.

The fit never sees SIGUSR2 (it is ignored in the child): only the wrapper decides what a signal means.
Job ids go to ``<workdir>/slurm_jobs.json`` (run name → job id) so that the same command does not resubmit a
job that is still queued or running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from dime_lightning.checkpointing import folder_checkpoints
from dime_lightning.errors import EXIT_SIGTERM, FitFailed, SlurmError

REGISTRY = "slurm_jobs.json"
SBATCH_KEY = re.compile(r"[a-z][a-z0-9-]*")
JOB_ID = re.compile(r"\d+(_\d+)?")  # a job, or one task of an array
PROGRAMS = ("sbatch", "srun", "squeue", "scontrol")
RESERVED = {"signal": "--slurm_signal_delay (the checkpoint signal is SIGUSR2)", "time": "--slurm_time",
            "job-name": "the run name", "output": "submitit", "error": "submitit", "nodes": "reproduce (1 per job)",
            "ntasks-per-node": "reproduce (1 per job)", "requeue": "reproduce (always on)"}


@dataclass(frozen=True)
class SlurmOptions:
    """The settings of every job of a reproduction (one task each, on one node)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus: int = 0
    cpus: int = 1
    mem_gb: float | None = None
    time_min: int = 60
    signal_delay_s: int = 120
    max_requeues: int = 20
    sbatch: tuple[str, ...] = ()

    def check(self) -> None:
        """``SlurmError`` naming the first option out of range."""
        for name, value, low in (("--slurm_gpus", self.gpus, 0), ("--slurm_cpus", self.cpus, 1),
                                 ("--slurm_time", self.time_min, 1), ("--slurm_signal_delay", self.signal_delay_s, 1),
                                 ("--slurm_max_requeues", self.max_requeues, 0)):
            if value < low:
                raise SlurmError(f"{name} must be >= {low}, got {value}")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise SlurmError(f"--slurm_mem_gb must be > 0, got {self.mem_gb}")
        if self.signal_delay_s >= self.time_min * 60:
            raise SlurmError(f"--slurm_signal_delay ({self.signal_delay_s} s) must be shorter than --slurm_time "
                             f"({self.time_min} min)")
        self.extra_parameters()

    def extra_parameters(self) -> dict[str, str | bool]:
        """``--slurm_sbatch KEY[=VALUE]`` as sbatch parameters (a KEY alone is a flag)."""
        found: dict[str, str | bool] = {}
        for item in self.sbatch:
            key, sep, value = item.lstrip("-").partition("=")
            if not SBATCH_KEY.fullmatch(key):
                raise SlurmError(f"--slurm_sbatch {item!r}: expected an sbatch option as KEY=VALUE or KEY "
                                 "(e.g. constraint=a100, exclusive)")
            if key in RESERVED:
                raise SlurmError(f"--slurm_sbatch {item!r}: {key} is set by {RESERVED[key]}")
            found[key] = value if sep else True
        return found

    def executor_parameters(self) -> dict:
        """The ``submitit.SlurmExecutor.update_parameters`` keywords of these options."""
        params = {"time": self.time_min, "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": self.cpus,
                  "signal_delay_s": self.signal_delay_s, "stderr_to_stdout": True}
        optional = {"partition": self.partition, "account": self.account, "qos": self.qos,
                    "gpus_per_node": self.gpus or None,
                    "mem": f"{int(self.mem_gb * 1024)}M" if self.mem_gb else None}
        params.update({k: v for k, v in optional.items() if v is not None})
        extra = {"requeue": True, **self.extra_parameters()}
        params["additional_parameters"] = extra
        return params


OPTIONS = ("--slurm_partition", "--slurm_account", "--slurm_qos", "--slurm_gpus", "--slurm_cpus", "--slurm_mem_gb",
           "--slurm_time", "--slurm_signal_delay", "--slurm_max_requeues", "--slurm_sbatch")


def add_arguments(parser: ArgumentParser) -> None:
    """The ``--slurm_*`` options (``OPTIONS``) of ``reproduce`` (used with ``--launcher slurm``)."""
    group = parser.add_argument_group("SLURM (--launcher slurm; one job per task and seed, one node each)")
    group.add_argument("--slurm_partition", default=None, help="partition (default: the cluster's)")
    group.add_argument("--slurm_account", default=None, help="account to charge")
    group.add_argument("--slurm_qos", default=None, help="quality of service")
    group.add_argument("--slurm_gpus", type=int, default=0, help="GPUs per job (0: none)")
    group.add_argument("--slurm_cpus", type=int, default=1, help="CPUs per job (the fit's OMP_NUM_THREADS)")
    group.add_argument("--slurm_mem_gb", type=float, default=None, help="memory per job in GiB (default: the "
                       "cluster's)")
    group.add_argument("--slurm_time", type=int, default=60, help="time limit per attempt in minutes; a job that "
                       "reaches it writes its checkpoint and is requeued")
    group.add_argument("--slurm_signal_delay", type=int, default=120, help="seconds between the checkpoint signal "
                       "and the time limit (SLURM may send it up to 60 s earlier)")
    group.add_argument("--slurm_max_requeues", type=int, default=20, help="requeues after a time limit before a "
                       "job is left FAILED (preemptions are not counted)")
    group.add_argument("--slurm_sbatch", nargs="*", default=[], metavar="KEY=VALUE",
                       help="further sbatch options, e.g. constraint=a100 exclusive")


def options_from_args(args: Namespace) -> SlurmOptions:
    """The ``SlurmOptions`` of parsed ``add_arguments`` options."""
    return SlurmOptions(args.slurm_partition, args.slurm_account, args.slurm_qos, args.slurm_gpus, args.slurm_cpus,
                        args.slurm_mem_gb, args.slurm_time, args.slurm_signal_delay, args.slurm_max_requeues,
                        tuple(args.slurm_sbatch))


def _submitit():
    """The submitit module, imported without its logging set-up: on import it calls ``logging.config.dictConfig``,
    which closes every logging handler of the process (a handler that closes its stream, as absl's does, then
    closes a stream it shares with others). ``SUBMITIT_LOG_LEVEL=NOCONFIG`` (submitit's own switch) skips that,
    for this import only: the jobs' environment keeps the user's setting. ``SlurmError`` without submitit."""
    saved = os.environ.get("SUBMITIT_LOG_LEVEL")
    os.environ["SUBMITIT_LOG_LEVEL"] = "NOCONFIG"
    try:
        import submitit
    except ImportError as err:
        raise SlurmError("--launcher slurm needs submitit: install the slurm extra (pip install "
                         "'dime-lightning[slurm]' or, in a checkout, pip install -e '.[slurm]')") from err
    finally:
        if saved is None:
            os.environ.pop("SUBMITIT_LOG_LEVEL", None)
        else:
            os.environ["SUBMITIT_LOG_LEVEL"] = saved
    return submitit


def check_programs() -> None:
    """``SlurmError`` when submitit or the SLURM client programs are missing (not on a login node)."""
    _submitit()
    missing = [name for name in PROGRAMS if shutil.which(name) is None]
    if missing:
        raise SlurmError(f"--launcher slurm needs the SLURM client programs; not on PATH: {', '.join(missing)}")


def _ignore_usr2() -> None:  # in the fit's process, before exec: the checkpoint signal is the wrapper's alone
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class FitJob:
    """One fit inside a SLURM job, resumed from its own checkpoints on every attempt (submitit calls
    ``checkpoint`` on the time-limit signal, as for its ``Checkpointable``).

    command: the fit's command line (without ``--ckpt_path``).
    folder: the fit's checkpoint folder.
    log: file the fit's output is appended to.
    threads: OMP_NUM_THREADS of the fit when not set.
    stop_timeout_s: seconds the fit gets to write its checkpoint after SIGTERM before it is killed."""

    def __init__(self, command: list[str], folder: Path, log: Path, threads: int, stop_timeout_s: float):
        self.command, self.folder, self.log = list(command), Path(folder), Path(log)
        self.threads, self.stop_timeout_s = threads, stop_timeout_s
        self._process: subprocess.Popen | None = None
        self._code: int | None = None

    def __getstate__(self) -> dict:  # the running fit is not part of the requeued job
        return {**self.__dict__, "_process": None, "_code": None}

    def attempt_command(self) -> list[str]:
        """The command of this attempt: ``--ckpt_path last`` once the folder holds a checkpoint."""
        resume = self.folder.is_dir() and bool(folder_checkpoints(self.folder))
        return [*self.command, "--ckpt_path", "last"] if resume else list(self.command)

    def _reap(self) -> int | None:
        # os.waitpid, not Popen.poll/wait: checkpoint() runs in a signal handler that may interrupt the loop of
        # __call__, and Popen's wait lock is not reentrant
        if self._code is None and self._process is not None:
            try:
                pid, status = os.waitpid(self._process.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by the interrupted loop before it stored the code
                return self._code if self._code is not None else -signal.SIGKILL
            if pid:
                self._code = self._process.returncode = os.waitstatus_to_exitcode(status)
        return self._code

    def __call__(self) -> int:
        command = self.attempt_command()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ}
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
        with self.log.open("a") as handle:
            handle.write(f"=== SLURM job {os.environ.get('SLURM_JOB_ID', '?')}, attempt {int(attempt) + 1}: "
                         f"{' '.join(command)}\n")
            handle.flush()
            self._process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                             preexec_fn=_ignore_usr2)
        while (code := self._reap()) is None:
            time.sleep(0.5)
        if code == 0:
            return 0
        if code in (EXIT_SIGTERM, -signal.SIGTERM):
            raise FitFailed(f"the fit stopped on SIGTERM and wrote its checkpoint: if SLURM requeues the job "
                            f"(preemption, scontrol requeue) the next attempt resumes it; see {self.log}")
        raise FitFailed(f"the fit exited with {code}; not requeued (see {self.log})")

    def checkpoint(self):
        """Stop the fit with SIGTERM (it writes its checkpoint) and hand the same job back for requeueing."""
        if self._process is not None and self._reap() is None:
            self._process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            while self._reap() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._reap() is None:  # the last periodic checkpoint stays
                self._process.kill()
                while self._reap() is None:
                    time.sleep(0.1)
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def read_registry(workdir: Path) -> dict[str, str]:
    """Run name → SLURM job id of the jobs submitted from ``workdir`` (empty when none)."""
    path = workdir / REGISTRY
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SlurmError(f"{path}: not readable as JSON ({err}); move it away to submit afresh") from err
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and JOB_ID.fullmatch(v)
                                             for k, v in data.items()):
        raise SlurmError(f"{path} is not a JSON object of run name -> SLURM job id (digits); move it away to submit "
                         "afresh")
    return data


def write_registry(workdir: Path, registry: dict[str, str]) -> None:
    """Replace ``<workdir>/slurm_jobs.json`` atomically."""
    path = workdir / REGISTRY
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(registry, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def queued_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state of those of ``job_ids`` still in the queue (pending, running, requeued, completing, ...)."""
    if not job_ids:
        return {}
    out = subprocess.run(["squeue", "-h", "--me", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SlurmError(f"squeue failed ({out.returncode}): {out.stderr.strip()}")
    listed = dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)
    return {job: listed[job] for job in job_ids if job in listed}


def final_state(job_id: str) -> str:
    """The SLURM state of a job that left the queue, from the controller while it remembers it, else accounting;
    ``unknown`` when neither knows."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    if out.returncode == 0 and (found := re.search(r"JobState=(\S+)", out.stdout)):
        return found.group(1)
    if shutil.which("sacct"):
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True,
                             text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    return "unknown"


def submit(jobs: list[tuple[str, FitJob]], options: SlurmOptions, workdir: Path) -> dict[str, str]:
    """Submit one job per (name, FitJob), named after the run; returns name → job id (also in the registry).

    jobs: run names and their jobs.
    options: the job settings.
    workdir: the reproduction's folder (submitit's files go to ``<workdir>/submitit``)."""
    executor = _submitit().SlurmExecutor(folder=workdir / "submitit" / "%j", max_num_timeout=options.max_requeues)
    executor.update_parameters(**options.executor_parameters())
    registry = read_registry(workdir)
    submitted = {}
    for name, job in jobs:
        executor.update_parameters(job_name=name)
        try:
            handle = executor.submit(job)
        except Exception as err:  # submitit raises subprocess and parsing errors for a refused sbatch
            raise SlurmError(f"{name}: sbatch refused the job: {err}") from err
        registry[name] = submitted[name] = str(handle.job_id)
        write_registry(workdir, registry)  # after each: an error later keeps the ids of what was submitted
        print(f"{name}: submitted as SLURM job {handle.job_id}", flush=True)
    return submitted
