"""A real single-node SLURM cluster in a temporary folder, for the tests: munged, slurmctld and slurmd from
Debian's packages (``apt-get install slurmctld slurmd slurm-client munge``), configured under the folder, on
free ports, torn down afterwards. It runs jobs as the calling user; the daemons need root (CI runs as root).

    with LocalSlurm(tmp_path) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)   # or os.environ.update(cluster.env)

Also a command line, to try the commands of the README by hand (``python tests/slurm_cluster.py /tmp/slurm``
prints the ``export SLURM_CONF=...`` line and keeps the cluster up until Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")


def missing_binaries() -> list[str]:
    """The SLURM and munge programs not on PATH (nor in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    return [name for name in DAEMONS if shutil.which(name, path=path) is None]


def skip_reason() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    missing = missing_binaries()
    if missing:
        return f"SLURM binaries absent: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd runs jobs as their user)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + slurmd on this machine, one node (all its CPUs), one partition ``debug``.

    folder: where the configuration, state, logs and sockets go (short paths: a socket path has ~100 bytes)."""

    def __init__(self, folder: Path, cpus: int | None = None):
        self.folder = Path(folder)
        self.cpus = cpus or os.cpu_count() or 1
        self.node = socket.gethostname()
        self.processes: list[subprocess.Popen] = []
        self.env: dict[str, str] = {}

    def _sbin(self, name: str) -> str:
        return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin") or name

    def _write_config(self) -> Path:
        f = self.folder
        for sub in ("state", "spool", "log", "munge"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(f / "munge", 0o700)
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        conf = f / "slurm.conf"
        conf.write_text("\n".join([
            "ClusterName=dimetest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={f / 'munge' / 'munge.sock'}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={f / 'state'}", f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}", f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "SwitchType=switch/none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2", "JobRequeue=1", "KillWait=30", "MinJobAge=600",
            "SlurmctldTimeout=30", "SlurmdTimeout=60", "InactiveLimit=0", "Waittime=0",
            "SchedulerParameters=sched_interval=2", "MessageTimeout=20",
            f"DefMemPerCPU={memory_mb // 2 // self.cpus}",  # a job without --mem does not take the whole node
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory_mb // 2} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            ""]))
        return conf

    def __enter__(self) -> LocalSlurm:
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        conf = self._write_config()
        m = self.folder / "munge"
        key = m / "munge.key"
        subprocess.run([self._sbin("mungekey"), "--create", f"--keyfile={key}", "--force"], check=True)
        os.chmod(key, 0o600)
        self.env = {"SLURM_CONF": str(conf)}
        env = {**os.environ, **self.env}
        log = self.folder / "log"
        self.processes.append(subprocess.Popen(
            [self._sbin("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={m / 'munge.sock'}",
             f"--pid-file={m / 'munged.pid'}", f"--log-file={log / 'munged.log'}", f"--seed-file={m / 'seed'}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        self._wait_for(lambda: (m / "munge.sock").exists(), "munged's socket", log / "munged.log")
        for daemon in ("slurmctld", "slurmd"):
            self.processes.append(subprocess.Popen(
                [self._sbin(daemon), "-D", "-f", str(conf)], env=env, stdout=(log / f"{daemon}.out").open("w"),
                stderr=subprocess.STDOUT))
        self._wait_for(self._node_idle, f"node {self.node} idle", log / "slurmd.log")
        return self

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env={**os.environ, **self.env},
                             capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() in ("idle", "idle~")

    def _wait_for(self, ready, what: str, log: Path, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        tail = log.read_text()[-3000:] if log.exists() else "(no log)"
        self.__exit__(None, None, None)
        raise RuntimeError(f"local SLURM: {what} not ready (exited: {dead}); {log}:\n{tail}")

    def __exit__(self, *exc) -> None:
        env = {**os.environ, **self.env}
        subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=env, capture_output=True)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM too (a background shell job ignores SIGINT): tear the cluster down


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dime-slurm")
    signal.signal(signal.SIGTERM, _stop)
    with LocalSlurm(folder) as cluster:
        print(f"export SLURM_CONF={cluster.env['SLURM_CONF']}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
