"""The fit's ``host_memory`` setting (host_memory.py): freed host memory kept for the next update, or glibc's
defaults."""

from __future__ import annotations

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
# an update in miniature, in a fresh process: 8 MiB allocated in 1 MiB blocks and freed, 50 times; the minor page
# faults of the last 40 rounds (glibc's defaults give the freed top of the heap back and fault it in again)
FAULTS = """
import resource, sys, torch
from dime_lightning.host_memory import apply
changed = apply(sys.argv[1])
def rounds(n):
    for _ in range(n):
        blocks = [torch.ones(2**18) for _ in range(8)]
        del blocks
for _ in range(10):
    rounds(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(40)
print(changed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(setting: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, setting], capture_output=True, text=True, check=True).stdout
    changed, faults = out.split()
    return changed == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="the setting changes glibc's malloc only")
def test_keep_stops_the_page_faults_of_memory_freed_and_allocated_again() -> None:
    kept, system = page_faults("keep"), page_faults("system")
    assert kept[0] and not system[0]  # what apply reports: changed with keep only
    assert system[1] > 40 * 250  # 1,000–2,000 faults of 4 KiB pages per round measured with glibc's defaults
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
