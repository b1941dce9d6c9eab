"""Layers shared by the networks: Flax's ``Dense`` initialisation in PyTorch."""

from __future__ import annotations

import math

import torch
from torch import nn


def lecun_normal_(weight: torch.Tensor, fan_in: int | None = None) -> torch.Tensor:
    """LeCun-normal init (truncated normal with variance 1/fan_in), the Flax Dense default."""
    fan_in = weight.shape[1] if fan_in is None else fan_in
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # correct for truncation at ±2σ
    return nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)


def dense(in_features: int, out_features: int, bias: bool = True, fan_in: int | None = None) -> nn.Linear:
    """``nn.Linear`` with LeCun-normal weights and zero bias (``fan_in`` overrides the weight's own)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    lecun_normal_(layer.weight, fan_in)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer
