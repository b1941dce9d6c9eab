"""The start-up self-check of the compiled "whole" update (update.py): captured programs against eager ones.

CUDA-graph capture can give silently wrong numbers (a replay reading memory that an input no longer lives in, a
tensor written outside the graph that the graph never sees). Before the first real update on a GPU, the updater
runs a few env steps' updates twice from the same state, the same minibatches and the same random stream: once
through the compiled (captured) programs, once through the same programs run eagerly. Every tensor they update
(parameters, batch-renorm statistics, optimizer state, non-finite counters) and every loss they return must agree;
the state is restored afterwards, so the check leaves no trace on the run. A mismatch is named, and the updater
falls back to eager updates with one warning.

The programs are compiled with inductor's ``fallback_random``: their noise comes from the eager generator, so
both runs see the same diffusion noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from dime_lightning.program import assign_

# relative error (in norm) of what an update changed, above which the compiled run differs from the eager one:
# float32 rounding of fused kernels stays orders of magnitude below; a stale or missed write reaches ~1
TOLERANCE = 1e-2


def changes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: after[name].double() - before[name].double() for name in before}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / max(‖want‖, ‖got‖, tiny): 0 when equal, ~1 when unrelated. NaN where both have NaN agrees;
    any other non-finite value counts as 1 unless both are identical."""
    got, want = got.double(), want.double()
    both_nan = got.isnan() & want.isnan()
    got, want = got.masked_fill(both_nan, 0.0), want.masked_fill(both_nan, 0.0)
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return 0.0 if torch.equal(got, want) else 1.0
    scale = max(float(want.norm()), float(got.norm()), 1e-12)
    return float((got - want).norm()) / scale


def mismatch(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tolerance: float = TOLERANCE) -> str | None:
    """The worst of ``got`` against ``want`` (same names) as a message, if its relative error exceeds
    ``tolerance``; None when all agree."""
    errors = {name: relative_error(got[name], want[name]) for name in want}
    name = max(errors, key=errors.get, default=None)
    if name is None or errors[name] <= tolerance:
        return None
    return f"{name} differs by {errors[name]:.3g} (relative, in norm; tolerance {tolerance:g})"


def compare_runs(state: dict[str, torch.Tensor], compiled: Callable[[], dict[str, torch.Tensor]],
                 eager: Callable[[], dict[str, torch.Tensor]], seed: int = 0) -> str | None:
    """Run ``compiled`` and ``eager`` (each updates the tensors of ``state`` in place and returns its outputs by
    name) from the same state and random stream; restore the state; name the first disagreement (None if none).

    What each run changed (``state`` after − before) is compared, and so are their outputs."""
    before = {name: t.detach().clone() for name, t in state.items()}
    devices = sorted({t.device for t in state.values() if t.device.type == "cuda"}, key=str)
    results = []
    for run in (compiled, eager):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            outputs = run()
        after = {name: t.detach().clone() for name, t in state.items()}
        results.append((outputs, changes(before, after)))
        restore_(state.values(), before.values())
    (got_out, got_change), (want_out, want_change) = results
    return mismatch(got_out, want_out) or mismatch(got_change, want_change)


@torch.no_grad()
def restore_(tensors: Iterable[torch.Tensor], saved: Iterable[torch.Tensor]) -> None:
    """Write ``saved`` back into ``tensors`` in place (captured graphs keep reading the same memory)."""
    for tensor, value in zip(tensors, saved, strict=True):
        assign_(tensor, value)
