"""Optimizer conventions of the reference (docs/algorithm.md §1.7, §2.2, §5).

Actor and critic: Adam(lr 3e-4, β = (0.5, 0.999)). Actor gradients: NaN → 0, then each entry clipped to
[−clip, clip] (element-wise, not global-norm). Temperature: Adam(lr 1e-3) with default betas.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

ACTOR_CRITIC_BETAS = (0.5, 0.999)


def adam(
    params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = ACTOR_CRITIC_BETAS,
    fused: bool = False, capturable: bool = False,
):
    """Adam over the trainable ``params``; ``fused`` updates all of them in one kernel; ``capturable`` (CUDA)
    keeps the step counts on the device, so that a step can be captured in a CUDA graph."""
    return torch.optim.Adam([p for p in params if p.requires_grad], lr=lr, betas=betas, fused=fused or None,
                            capturable=capturable)


def zero_nan_and_clip(grad: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """NaN entries → 0, then every entry clamped to [−clip, clip] (±inf → ±clip)."""
    return grad.nan_to_num(nan=0.0, posinf=clip, neginf=-clip).clamp(-clip, clip)


@torch.no_grad()
def zero_nan_and_clip_gradients_(params: Iterable[torch.nn.Parameter], clip: float = 1.0) -> None:
    """``zero_nan_and_clip`` applied in place to the ``.grad`` of ``params``."""
    for p in params:
        if p.grad is not None:
            p.grad.copy_(zero_nan_and_clip(p.grad, clip))


@torch.no_grad()
def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of ``tensors`` as a detached tensor (for logging; no host sync); 0 for none."""
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def gradient_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` (those that have one)."""
    return global_norm(p.grad for p in params if p.grad is not None)
