"""Multi-process training (Lightning DDP): the strategy DIME's schedule needs and the few collectives it uses.

DIME's update runs three backward passes per ``training_step`` (critic, actor, temperature), each reaching
only its own parameters, and none during the random warm-up. DDP's reducer must therefore be told which
parameters a backward did not reach: ``find_unused_parameters=True``. Gradients are averaged over ranks as
usual, so every rank takes the same optimizer steps and parameters stay identical.

Batch renormalisation under DDP: each rank normalises its own minibatch with its own batch statistics (as a
plain BatchNorm layer does under DDP; no per-layer collective inside the forward), and the running statistics
are averaged over ranks after every critic update (one all-reduce of a few kilobytes). The running mean is
then exactly the running mean of the global batch's mean, and every rank evaluates the critic (actor loss,
acting) with the same statistics. DDP's own per-forward buffer broadcast (rank 0's buffers to all) is off;
buffers are still synced once when the model is wrapped, so all ranks start from the same statistics.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from torch.nn.parallel import DistributedDataParallel

from dime_lightning.compat import add_ddp_kwargs
from dime_lightning.errors import BadInputError

DDP_NAMES = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")
# torch >= 2.13 names the per-forward buffer broadcast `forward_sync_buffers`; older versions `broadcast_buffers`
_DDP_ARGS = inspect.signature(DistributedDataParallel).parameters
_SYNC_BUFFERS = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"
DDP_KWARGS = {"find_unused_parameters": True, _SYNC_BUFFERS: False}


def resolve_strategy(strategy: str | Strategy | None) -> str | Strategy | None:
    """``trainer.strategy`` as DIME needs it: the DDP names become a ``DDPStrategy`` with ``DDP_KWARGS``.

    Strategies that launch by pickling or shard parameters (ddp_spawn, fsdp, deepspeed, …) are refused with a
    message; single-process strategies pass through.
    """
    if isinstance(strategy, DDPStrategy):
        add_ddp_kwargs(strategy, DDP_KWARGS)  # a configured DDPStrategy keeps its other settings
        return strategy
    if isinstance(strategy, Strategy) and not isinstance(strategy, SingleDeviceStrategy):
        raise BadInputError(f"trainer.strategy {type(strategy).__name__} is not supported: use 'auto' or 'ddp'")
    if strategy is None or isinstance(strategy, SingleDeviceStrategy) or strategy in ("auto", "single_device"):
        return strategy
    if strategy in DDP_NAMES:
        return DDPStrategy(**DDP_KWARGS)
    raise BadInputError(
        f"trainer.strategy {strategy!r} is not supported: use 'auto' (one process) or 'ddp' (several devices "
        "or nodes; launched by Lightning or by torchrun/SLURM)"
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_ranks_true(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce; the flag itself when not distributed)."""
    return max_over_ranks(0 if bool(flag) else 1, device) == 0


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` over ranks (one all-reduce; ``value`` itself when not distributed)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


@torch.no_grad()
def average_running_statistics_(module: torch.nn.Module) -> None:
    """Average every normalisation layer's ``running_mean`` and ``running_var`` over ranks, in place."""
    if not is_distributed():
        return
    buffers = [b for name, b in module.named_buffers()
               if name.endswith(("running_mean", "running_var")) and "pending_" not in name]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for buffer in buffers:
        buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
