"""The fit's ``host_memory`` setting (host_memory.py): freed host memory kept for the next update, or glibc's
defaults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dime_lightning import fit
from dime_lightning.errors import BadInputError
from dime_lightning.fit import build_cli
from dime_lightning.host_memory import apply

PENDULUM = Path(__file__).resolve().parents[1] / "conf" / "pendulum.yaml"
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# huge pages always on: the heap refills in 2 MiB pages, a few faults per round, which this test cannot tell apart
HUGE_PAGES = THP.exists() and "[always]" in THP.read_text()
ALLOCATOR_ENV = ("LD_PRELOAD", "GLIBC_TUNABLES")  # and every MALLOC_* variable: left out of the child's environment
# an update in miniature, in a fresh process, through the C allocator itself: 8 MiB in 1 MiB blocks allocated,
# written and freed, 50 times; the minor page faults of the last 40 rounds (glibc's defaults give the freed top of
# the heap back to the system, and the next round faults it in again)
FAULTS = """
import ctypes, resource, sys
from dime_lightning.host_memory import apply
changed = apply(sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)
def rounds(n):
    for _ in range(n):
        blocks = [libc.malloc(2**20) for _ in range(8)]
        for block in blocks:
            ctypes.memset(block, 1, 2**20)
        for block in reversed(blocks):
            libc.free(block)
rounds(10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(40)
print(changed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(setting: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", FAULTS, setting], capture_output=True, text=True, check=True,
                         env=env).stdout
    changed, faults = out.split()
    return changed == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="the setting changes glibc's malloc only")
@pytest.mark.skipif(HUGE_PAGES, reason="transparent huge pages always on: too few page faults to count")
def test_keep_stops_the_page_faults_of_memory_freed_and_allocated_again() -> None:
    kept, system = page_faults("keep"), page_faults("system")
    assert kept[0] and not system[0]  # what apply reports: changed with keep only
    assert system[1] > 40 * 1000  # 2,016 faults of 4 KiB pages per round measured with glibc's defaults
    assert kept[1] < system[1] / 20, (kept, system)


def test_a_bad_value_is_refused_and_the_default_is_keep(capsys) -> None:
    with pytest.raises(BadInputError, match=r"host_memory must be one of \('keep', 'system'\), got 'fast'"):
        apply("fast")
    with pytest.raises(SystemExit):
        build_cli(["--config", str(PENDULUM), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["host_memory"] == "keep"


def test_the_fit_applies_the_setting_before_it_trains(monkeypatch) -> None:
    calls = []
    trainer = SimpleNamespace(callbacks=[], fit=lambda *args, **kwargs: calls.append("fit"))
    cli = SimpleNamespace(config={"host_memory": "system"}, trainer=trainer, model=None, datamodule=None,
                          resume_path=None)
    monkeypatch.setattr(fit, "build_cli", lambda args: cli)
    monkeypatch.setattr(fit.host_memory, "apply", calls.append)
    fit.main([])
    assert calls == ["system", "fit"]
