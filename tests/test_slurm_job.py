"""The SLURM job wrapper and the SLURM options of ``reproduce`` without a cluster: what an attempt runs, how the
time-limit signal stops the fit, how errors end the job, and the input refused before anything is submitted
(tests/test_slurm.py runs the real thing on a local SLURM)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dime_lightning import reproduce, slurm

ROOT = Path(__file__).resolve().parents[1]
# a stand-in fit: reports how it sees SIGUSR2, then waits; on SIGTERM it "writes its checkpoint" and exits 143
FAKE_FIT = ("import signal, sys, time\n"
            "print('usr2', signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN, flush=True)\n"
            "def stop(*_):\n"
            "    open(sys.argv[1], 'w').write('checkpoint')\n"
            "    sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "time.sleep(60)\n")


def job_for(tmp_path: Path, command: list[str]) -> slurm.FitJob:
    return slurm.FitJob(command, tmp_path / "ckpt", tmp_path / "fit.log", threads=1, stop_timeout_s=20)


def test_an_attempt_resumes_once_the_folder_holds_a_checkpoint(tmp_path):
    job = job_for(tmp_path, ["fit", "--seed_everything", "0"])
    assert job.attempt_command() == ["fit", "--seed_everything", "0"]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "step-0000000100.ckpt").write_bytes(b"")
    assert job.attempt_command() == ["fit", "--seed_everything", "0", "--ckpt_path", "last"]


class Requeued(Exception):
    pass


def test_the_time_limit_signal_stops_the_fit_and_hands_the_job_back(tmp_path):
    marker = tmp_path / "stopped"
    job = job_for(tmp_path, [sys.executable, "-c", FAKE_FIT, str(marker)])
    handed_back = []

    def on_usr2(signum, frame):  # what submitit does: checkpoint(), requeue, exit
        handed_back.append(job.checkpoint())
        raise Requeued

    def signal_once_ready() -> None:  # the stand-in has set its SIGTERM handler (a slow start is not the test)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "\nusr2 " not in (tmp_path / "fit.log").read_text():
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, on_usr2)
    try:
        os.environ["SLURM_RESTART_COUNT"] = "2"
        (tmp_path / "fit.log").write_text("")
        threading.Thread(target=signal_once_ready, daemon=True).start()
        with pytest.raises(Requeued):
            job()
    finally:
        signal.signal(signal.SIGUSR2, previous)
        os.environ.pop("SLURM_RESTART_COUNT", None)
    assert marker.read_text() == "checkpoint" and job._code == 143  # SIGTERM reached the fit, which stopped
    log = (tmp_path / "fit.log").read_text()
    assert "attempt 3:" in log and "usr2 True" in log  # the fit ignores the wrapper's signal
    delayed = handed_back[0]
    assert delayed.function is job
    again = pickle.loads(pickle.dumps(delayed.function))  # what submitit stores for the next attempt
    assert again.command == job.command and again._process is None and again._code is None


@pytest.mark.parametrize(("code", "message"), [(3, "the fit exited with 3; not requeued"),
                                               (143, "the fit stopped on SIGTERM and wrote its checkpoint")])
def test_a_failed_fit_fails_the_job(tmp_path, code, message):
    job = job_for(tmp_path, [sys.executable, "-c", f"raise SystemExit({code})"])
    with pytest.raises(slurm.FitFailed, match=message):
        job()
    assert job_for(tmp_path, [sys.executable, "-c", "pass"])() == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--tracking_uri", "sqlite:///x.db"], "--launcher slurm needs an MLflow tracking server"),
    (["--tracking_uri", "http://h:5000", "--slurm_sbatch", "signal=USR1@60"], "signal is set by --slurm_signal_delay"),
    (["--tracking_uri", "http://h:5000", "--slurm_sbatch", "Bad Key"], "expected an sbatch option"),
    (["--tracking_uri", "http://h:5000", "--slurm_time", "2", "--slurm_signal_delay", "120"],
     "--slurm_signal_delay (120 s) must be shorter than --slurm_time (2 min)"),
    (["--tracking_uri", "http://h:5000", "--slurm_cpus", "0"], "--slurm_cpus must be >= 1, got 0"),
])
def test_bad_slurm_input_exits_2_before_anything_is_submitted(tmp_path, capsys, args, message):
    code = reproduce.main(["--tasks", "pendulum", "--reference", "none", "--launcher", "slurm", "--workdir",
                           str(tmp_path / "runs"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_wait_is_for_the_slurm_launcher(tmp_path, capsys):
    assert reproduce.main(["--tasks", "pendulum", "--reference", "none", "--wait", "--workdir",
                           str(tmp_path)]) == 2
    assert "--wait is for --launcher slurm" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["{not json", '{"pendulum-seed0": "12; rm -rf /"}', "[1, 2]"])
def test_a_damaged_job_registry_is_refused_with_its_path(tmp_path, capsys, content):
    (tmp_path / slurm.REGISTRY).write_text(content)
    assert reproduce.main(["--tasks", "pendulum", "--reference", "none", "--status", "--workdir",
                           str(tmp_path)]) == 2
    assert f"{tmp_path / slurm.REGISTRY}" in capsys.readouterr().err


# a handler that closes its stream when logging shuts it down, as absl's does (its stream is shared: sys.stderr)
SHARED_STREAM = ("import io, logging, os, sys\n"
                 "class Closing(logging.StreamHandler):\n"
                 "    def close(self):\n"
                 "        self.stream.close()\n"
                 "        super().close()\n"
                 "stream = io.StringIO()\n"
                 "logging.getLogger('user').addHandler(Closing(stream))\n"
                 "from dime_lightning import slurm\n"
                 "try:\n"
                 "    slurm.check_programs()\n"
                 "except slurm.SlurmError:\n"
                 "    pass\n"
                 "assert 'submitit' in sys.modules\n"
                 "print('closed', stream.closed, 'env', os.environ.get('SUBMITIT_LOG_LEVEL'))\n")


def test_importing_submitit_leaves_the_process_logging_handlers_alone():
    pytest.importorskip("submitit")
    out = subprocess.run([sys.executable, "-c", SHARED_STREAM], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "SUBMITIT_LOG_LEVEL"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["closed", "False", "env", "None"]  # and the jobs' environment is unchanged
