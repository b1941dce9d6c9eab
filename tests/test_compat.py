"""dime_lightning.compat against the installed Lightning: every private access it makes is still there and still
means what DIME relies on. A failure names the attribute and the Lightning version (then compat.py and the
pins in setup.py need a look)."""

from __future__ import annotations

from importlib import metadata

import lightning.pytorch as pl
import lightning.pytorch.strategies.ddp as lightning_ddp
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

from dime_lightning import compat
from dime_lightning.compat import (
    LibraryChangedError,
    add_ddp_kwargs,
    datamodule_checkpoint_key,
    ddp_kwargs,
    lightning_logs_this_step,
    reopen_finished_fit,
)

LIGHTNING = f"lightning {metadata.version('lightning')}"
QUIET = dict(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
             accelerator="cpu", devices=1)


class StepLogger(Logger):
    """Records the values of metric "value" that Lightning writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[float] = []

    name, version = "steps", "0"

    def log_metrics(self, metrics, step=None) -> None:
        if "value" in metrics:
            self.written.append(float(metrics["value"]))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


class CountingModule(pl.LightningModule):
    """Manual optimization like DIMEModule; records per batch whether Lightning says it writes logs."""

    def __init__(self, reopen: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(1, 1)
        self.flags: list[bool] = []
        self.reopen = reopen

    def training_step(self, batch, batch_idx) -> None:
        self.flags.append(lightning_logs_this_step(self.trainer))
        self.log("value", float(len(self.flags)), on_step=True, on_epoch=False, batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_load_checkpoint(self, checkpoint) -> None:
        if self.reopen:
            reopen_finished_fit(checkpoint)


def batches(n: int) -> DataLoader:
    return DataLoader(torch.zeros(n, 1), batch_size=1)


def test_logging_cadence_is_the_batches_whose_metrics_lightning_writes() -> None:
    """Trainer._logger_connector.should_update_logs: True exactly on the batches whose logged values reach
    the logger, every log_every_n_steps batches."""
    module, logger = CountingModule(), StepLogger()
    trainer = pl.Trainer(max_epochs=1, log_every_n_steps=3, logger=logger, **QUIET)
    trainer.fit(module, batches(8))
    flagged = [float(i + 1) for i, flag in enumerate(module.flags) if flag]
    assert len(module.flags) == 8
    assert flagged == [3.0, 6.0], f"{LIGHTNING}: should_update_logs no longer follows log_every_n_steps"
    assert logger.written == flagged, f"{LIGHTNING}: should_update_logs no longer tells which batches are written"


def test_logging_cadence_fails_loudly_when_the_connector_is_gone() -> None:
    with pytest.raises(LibraryChangedError, match=r"lightning \d.*_logger_connector\.should_update_logs"):
        lightning_logs_this_step(object())


def test_finished_fit_is_reopened_by_rewriting_the_checkpoints_loop_progress(tmp_path) -> None:
    """The fit-loop progress keys exist in a real checkpoint, and rewriting them is what makes a resumed fit of
    a finished run train on (without it Lightning does nothing)."""
    path = tmp_path / "finished.ckpt"
    trainer = pl.Trainer(max_epochs=1, logger=False, **QUIET)
    trainer.fit(CountingModule(), batches(3))
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert progress["completed"] == 1, f"{LIGHTNING}: fit_loop.epoch_progress no longer counts finished epochs"
    reopen_finished_fit(checkpoint)
    fit_loop = checkpoint["loops"]["fit_loop"]
    assert fit_loop["epoch_progress"]["current"] == dict.fromkeys(compat.PROGRESS_COUNTERS, 0)
    assert fit_loop["epoch_loop.batch_progress"]["is_last_batch"] is False

    resumed = {}
    for reopen in (False, True):
        module = CountingModule(reopen=reopen)
        pl.Trainer(max_epochs=1, logger=False, **QUIET).fit(module, batches(5), ckpt_path=path, weights_only=True)
        resumed[reopen] = len(module.flags)
    assert resumed[False] == 0, f"{LIGHTNING}: a finished fit now resumes by itself; reopen_finished_fit may go"
    assert resumed[True] > 0, f"{LIGHTNING}: rewriting checkpoint['loops']['fit_loop'] no longer reopens the fit"


@pytest.mark.parametrize("broken", [
    {"loops": {}},
    {"loops": {"fit_loop": {"epoch_progress": {"total": {}, "current": {}}}}},
    {"loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 1}, "current": {"ready": 1}},
                            "epoch_loop.batch_progress": {"is_last_batch": True}}}},
])
def test_reopen_fails_loudly_on_another_checkpoint_layout(broken) -> None:
    with pytest.raises(LibraryChangedError, match=r"lightning \d.*fit_loop"):
        reopen_finished_fit(broken)
    reopen_finished_fit({"state_dict": {}})  # weights only: no loop state, nothing to do


def test_datamodule_state_is_stored_under_the_key_compat_names(tmp_path) -> None:
    class Stateful(pl.LightningDataModule):  # a nested class: its __qualname__ differs from its __name__
        def train_dataloader(self):
            return batches(2)

        def state_dict(self):
            return {"marker": 7}

    data = Stateful()
    trainer = pl.Trainer(max_epochs=1, logger=False, **QUIET)
    trainer.fit(CountingModule(), datamodule=data)
    trainer.save_checkpoint(tmp_path / "data.ckpt")
    checkpoint = torch.load(tmp_path / "data.ckpt", weights_only=True)
    key = datamodule_checkpoint_key(data)
    assert key != type(data).__name__
    assert checkpoint.get(key) == {"marker": 7}, (
        f"{LIGHTNING}: the data module's state is no longer under its class's __qualname__ "
        f"(keys: {sorted(checkpoint)})")


def test_ddp_kwargs_reach_distributed_data_parallel(monkeypatch) -> None:
    """DDPStrategy._ddp_kwargs: the constructor's DDP keywords live there, and added ones reach
    DistributedDataParallel when the strategy wraps the model."""
    received = {}

    class RecordingDDP(nn.Module):
        def __init__(self, module, device_ids=None, **kwargs) -> None:
            super().__init__()
            received.update(kwargs)

    strategy = DDPStrategy(parallel_devices=[torch.device("cpu")], gradient_as_bucket_view=True)
    assert ddp_kwargs(strategy) == {"gradient_as_bucket_view": True}, f"{LIGHTNING}: DDPStrategy._ddp_kwargs"
    add_ddp_kwargs(strategy, {"find_unused_parameters": True})
    monkeypatch.setattr(lightning_ddp, "DistributedDataParallel", RecordingDDP)
    strategy._setup_model(nn.Linear(1, 1))  # private, probed here only: how the strategy wraps the model
    assert received == {"gradient_as_bucket_view": True, "find_unused_parameters": True}, (
        f"{LIGHTNING}: DDPStrategy._ddp_kwargs no longer reach DistributedDataParallel")


def test_ddp_kwargs_fail_loudly_when_gone() -> None:
    with pytest.raises(LibraryChangedError, match=r"lightning \d.*DDPStrategy\._ddp_kwargs"):
        add_ddp_kwargs(object(), {"find_unused_parameters": True})


def test_compile_ahead_of_time_runs_the_compiled_code_with_no_guard_check() -> None:
    """What program.AheadOfTime relies on: the artifact computes what the function does, and calling it checks
    nothing (an int compiled in as a constant is not re-checked: the caller keys its artifacts on such values)."""
    def scale(x: torch.Tensor, k: int) -> torch.Tensor:
        return x * k

    artifact = compat.compile_ahead_of_time(torch.compile(scale, fullgraph=True), (torch.ones(2), 2))
    torch.testing.assert_close(artifact(torch.arange(2.0), 2), torch.tensor([0.0, 2.0]))
    assert torch.equal(artifact(torch.ones(2), 3), torch.full((2,), 2.0)), (
        "torch: aot_compile(...).disable_guard_check() no longer skips the guards")


def test_compile_ahead_of_time_fails_loudly_when_gone() -> None:
    with pytest.raises(LibraryChangedError, match=r"torch \d.*aot_compile"):
        compat.compile_ahead_of_time(lambda x: x, (torch.ones(1),))


def test_compile_ahead_of_time_traces_again_when_dynamo_asks_and_clears_its_record(monkeypatch) -> None:
    """Dynamo's request to trace again with floats specialized (raised by the ahead-of-time path, which does not
    restart by itself) is honoured; what it recorded is cleared afterwards, so it reaches no other compilation."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis
    from torch._dynamo.symbolic_convert import TensorifyState

    compiled = torch.compile(lambda x: x * 2, fullgraph=True)
    calls = []
    real = compiled.aot_compile

    def asks_once(example):
        calls.append(example)
        if len(calls) == 1:
            TensorifyState.specialize("zf0")
            raise TensorifyScalarRestartAnalysis
        return real(example)

    monkeypatch.setattr(compiled, "aot_compile", asks_once)
    artifact = compat.compile_ahead_of_time(compiled, (torch.ones(2),))
    assert len(calls) == 2 and torch.equal(artifact(torch.ones(2)), torch.full((2,), 2.0))
    assert TensorifyState.empty()


def test_graph_break_errors_are_what_tracing_into_one_graph_raises() -> None:
    """What program.compile_acting falls back on: a branch on a tensor's value cannot be one graph."""
    def branches(x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x

    with pytest.raises(compat.graph_break_errors()):
        compat.compile_ahead_of_time(torch.compile(branches, fullgraph=True), (torch.ones(2),))
