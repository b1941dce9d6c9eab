"""distributed.py's collectives in a real 2-process gloo group (torch.multiprocessing), and strategy choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy

from dime_lightning.compat import ddp_kwargs
from dime_lightning.critic import DistributionalCritic
from dime_lightning.distributed import (
    DDP_KWARGS,
    all_ranks_true,
    average_running_statistics_,
    gather_objects,
    is_distributed,
    max_over_ranks,
    resolve_strategy,
)
from dime_lightning.fit import build_cli

CONF = Path(__file__).resolve().parents[1] / "conf"


def _worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        critic = DistributionalCritic(3, 2, hidden_dims=(8, 8), num_atoms=5, v_min=-1.0, v_max=1.0)
        critic(torch.randn(16, 3) + 3.0 * rank, torch.randn(16, 2))  # train mode: rank-specific statistics
        # the checkpointed statistics (not the pending copies a compiled update applies after its backward)
        before = {k: v.clone() for k, v in critic.state_dict().items() if k.endswith(("running_mean", "running_var"))}
        average_running_statistics_(critic)
        after = {k: v.clone() for k, v in critic.state_dict().items() if k.endswith(("running_mean", "running_var"))}
        results[rank] = {
            "distributed": is_distributed(),
            "all_true": all_ranks_true(True, torch.device("cpu")),
            "one_false": all_ranks_true(rank == 0, torch.device("cpu")),
            "max": max_over_ranks(2 * rank, torch.device("cpu")),
            "gathered": gather_objects({"rank": rank}),
            "before": before, "after": after,
        }
    finally:
        dist.destroy_process_group()


def test_collectives_in_a_two_process_group(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank]["distributed"] and results[rank]["all_true"]
        assert results[rank]["one_false"] is False  # rank 1's False reaches rank 0 too: both stop or skip
        assert results[rank]["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert results[rank]["max"] == 2
    before, after = results[0]["before"], results[1]["after"]
    assert before.keys() == after.keys() and len(before) == 12  # 2 critics × 3 batch-renorm layers × 2
    for key in before:
        assert not torch.equal(results[0]["before"][key], results[1]["before"][key])  # rank-specific ...
        expected = (results[0]["before"][key] + results[1]["before"][key]) / 2
        assert torch.allclose(results[0]["after"][key], expected)  # ... averaged, identical on both ranks
        assert torch.equal(results[0]["after"][key], results[1]["after"][key])


def test_single_process_helpers_are_plain():
    assert not is_distributed()
    assert all_ranks_true(torch.tensor(True), torch.device("cpu")) and not all_ranks_true(False, torch.device("cpu"))
    assert gather_objects(3) == [3]


def test_strategy_resolution():
    strategy = resolve_strategy("ddp")
    assert isinstance(strategy, DDPStrategy)
    assert ddp_kwargs(strategy)["find_unused_parameters"] is True
    assert ddp_kwargs(strategy) == DDP_KWARGS and False in DDP_KWARGS.values()  # no per-forward buffer broadcast
    configured = resolve_strategy(DDPStrategy(timeout=None, gradient_as_bucket_view=True))
    assert ddp_kwargs(configured) == {**DDP_KWARGS, "gradient_as_bucket_view": True}  # its own settings kept
    assert resolve_strategy("auto") == "auto" and resolve_strategy(None) is None
    with pytest.raises(ValueError, match="'ddp_spawn' is not supported"):
        resolve_strategy("ddp_spawn")
    with pytest.raises(ValueError, match="'fsdp' is not supported"):
        resolve_strategy("fsdp")


def test_several_devices_with_strategy_auto_get_the_ddp_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(CONF / "pendulum.yaml"), "--config", str(CONF / "smoke.yaml"),
                     "--trainer.devices", "2", "--mlflow.enabled", "false"])
    assert isinstance(cli.trainer.strategy, DDPStrategy) and cli.trainer.world_size == 2
    assert ddp_kwargs(cli.trainer.strategy) == DDP_KWARGS
