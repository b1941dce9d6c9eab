"""``auto`` for the speed settings (auto.py): what it resolves to on a CPU, on a (mocked) CUDA device and under DDP,
through the module's and the data module's own set-up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dime_lightning import auto
from dime_lightning.critic import BatchRenorm
from dime_lightning.data import ReplayDataModule
from dime_lightning.errors import BadInputError
from dime_lightning.module import DIMEModule
from dime_lightning.program import AheadOfTime
from dime_lightning.update_settings import UpdateSettings


def test_the_table() -> None:
    short, long = auto.WHOLE_MIN_LEARNING_STEPS - 1, auto.WHOLE_MIN_LEARNING_STEPS
    assert auto.update_mode("cpu", 1, short) == "none"  # a short CPU run never earns back the compile
    assert auto.update_mode("cpu", 1, long) == "whole"
    assert auto.update_mode("cpu", 1, None) == "none"  # unknown length: eager
    assert auto.update_mode("cuda", 1, short) == "whole"
    assert auto.update_mode("cuda", 2, long) == auto.update_mode("cpu", 2, long) == "none"  # DDP
    assert auto.update_mode("cuda", 1, long, mixed_precision=True) == "none"  # bf16-mixed: the tested eager path
    assert auto.act_mode("cuda", "none") == auto.act_mode("cuda", "whole") == "reduce-overhead"
    assert (auto.act_mode("cpu", "whole"), auto.act_mode("cpu", "none")) == ("default", "none")  # with the update
    assert auto.storage("cuda", need_bytes=10, free_device_bytes=20) == "device"
    assert auto.storage("cuda", need_bytes=11, free_device_bytes=20) == "memory"  # over half the free memory
    assert auto.storage("cpu", need_bytes=1, free_device_bytes=None) == "memory"


def trainer(device: str, processes: int = 1, learning_env_steps: int | None = 20_000,
            precision: str = "32-true") -> SimpleNamespace:
    """What DIMEModule.setup reads of a Trainer: world size, the strategy's device, the data module, precision."""
    data = SimpleNamespace(learning_env_steps=learning_env_steps)
    return SimpleNamespace(world_size=processes, strategy=SimpleNamespace(root_device=torch.device(device)),
                           datamodule=data, lightning_module=None, precision=precision)


def module_after_setup(device: str, processes: int = 1, learning_env_steps: int | None = 20_000,
                       precision: str = "32-true", **kwargs) -> DIMEModule:
    module = DIMEModule(3, 1, **kwargs)
    module.trainer = trainer(device, processes, learning_env_steps, precision)
    module.setup("fit")
    return module


@pytest.mark.parametrize(("device", "processes", "learning", "expected"), [
    ("cpu", 1, 300, {"compile": "none", "compile_act": "none"}),  # a smoke run
    ("cpu", 1, 7_000, {"compile": "none", "compile_act": "none"}),  # the Pendulum demo: at break-even
    ("cpu", 1, 50_000, {"compile": "whole", "compile_act": "default"}),
    ("cuda", 1, 300, {"compile": "whole", "compile_act": "reduce-overhead"}),
    ("cuda", 2, 50_000, {"compile": "none", "compile_act": "reduce-overhead"}),  # DDP
    ("cpu", 2, 50_000, {"compile": "none", "compile_act": "none"}),
])
def test_the_module_resolves_auto_at_setup(device, processes, learning, expected) -> None:
    """Nothing runs on the (mocked) CUDA device: setup only chooses; compiling and capturing happen at first use."""
    module = DIMEModule(3, 1)
    assert module.modes == {"compile": "none", "compile_act": "none"}  # outside a fit: eager
    module = module_after_setup(device, processes, learning)
    assert module.modes == expected
    assert isinstance(module._act, AheadOfTime) == (device == "cpu" and expected["compile_act"] != "none")
    assert module.hparams["update"]["compile"] == "auto"  # checkpoints keep the setting, not its resolution
    deferred = {m.defer_statistics for m in module.critic.modules() if isinstance(m, BatchRenorm)}
    assert deferred == {expected["compile"] != "none"}  # compiled updates apply batch-renorm statistics after backward


def test_bf16_mixed_keeps_the_update_eager() -> None:
    assert module_after_setup("cuda", precision="bf16-mixed").modes == {"compile": "none",
                                                                        "compile_act": "reduce-overhead"}


def test_explicit_modes_are_kept_and_whole_is_refused_under_ddp() -> None:
    module = module_after_setup("cuda", update=UpdateSettings(compile="default"), compile_act="none")
    assert module.modes == {"compile": "default", "compile_act": "none"}
    with pytest.raises(BadInputError, match="'whole' runs in one process"):
        module_after_setup("cpu", processes=2, update=UpdateSettings(compile="whole"))
    with pytest.raises(BadInputError, match=r"model.compile_act must be one of 'auto', 'none'"):
        DIMEModule(3, 1, compile_act="fast")


@pytest.mark.parametrize(("device", "free", "expected"), [
    ("cpu", None, "memory"), ("cuda", 10**12, "device"), ("cuda", 10**6, "memory")])
def test_the_data_module_resolves_storage_once(monkeypatch, device, free, expected) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    data = ReplayDataModule("Pendulum-v1", buffer_size=100_000)  # 100k transitions × 45 bytes ≈ 4.5 MB
    assert data.learning_env_steps == 1_000_000 - 5_000
    assert data.storage_for(torch.device(device)) == expected
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))
    assert data.storage_for(torch.device(device)) == expected  # decided once: resumed shards stay where they were
    assert ReplayDataModule("Pendulum-v1", storage="memmap").storage_for(torch.device("cuda")) == "memmap"
