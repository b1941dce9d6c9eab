"""DIME's three losses as pure functions (docs/algorithm.md §1.7, §2.2, §3).

Each public ``*_loss`` returns a TensorDict (batch_size []) holding its named loss (``loss_critic``,
``loss_actor``, ``loss_alpha``) with gradient, plus detached diagnostics, each name used by one loss only
(the update merges them into one dict of logged metrics). Nothing here steps an optimizer, logs, or reads a
tensor back to the host, so the update can be compiled and captured as a CUDA graph.

Batches follow TorchRL's layout: ``observation``, ``action`` and ``("next", "observation" | "reward" |
"terminated")``; ``terminated`` excludes time-limit truncation, so the target bootstraps through it.
"""

from __future__ import annotations

import contextlib

import torch
from tensordict import TensorDict
from torch import nn

from dime_lightning.critic import DistributionalCritic, project_distribution
from dime_lightning.temperature import Temperature


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is in a lower precision (bf16 autocast outputs); float32/float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def soft_distributional_target(
    next_probs: torch.Tensor,
    reward: torch.Tensor,
    terminated: torch.Tensor,
    next_log_prob: torch.Tensor,
    alpha: torch.Tensor,
    gamma: float,
    support: torch.Tensor,
    v_min: float,
    v_max: float,
) -> torch.Tensor:
    """Soft categorical Bellman target, the average of the critics' projections (docs/algorithm.md §2.2 3–5).

    T z_j = clip(r + γ(1 − d)(z_j − α log π̂(a'|s')), v_min, v_max), projected per critic onto the support,
    then averaged over critics. next_probs (C, B, K); reward, terminated, next_log_prob (B,) -> (B, K).
    """
    discount = gamma * (1.0 - terminated.to(next_probs.dtype))  # (B,)
    shifted = reward.unsqueeze(-1) + discount.unsqueeze(-1) * (
        support - alpha * next_log_prob.unsqueeze(-1)
    )  # (B, K)
    return project_distribution(next_probs, shifted, v_min, v_max, support.shape[0]).mean(0)


def categorical_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, entropy_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ_i [CE(target, p_i) − entropy_coef·H(p_i)], batch-averaged; logits (C, B, K), target (B, K).

    Returns (loss, cross-entropy per critic (C,), entropy per critic (C,)). Computed in (at least) float32 from
    log-softmax (the exact log p, no 1e-15 floor needed).
    """
    log_p = full_precision(logits).log_softmax(-1)  # (C, B, K)
    cross_entropy = -(full_precision(target) * log_p).sum(-1).mean(-1)  # (C,)
    entropy = -(log_p.exp() * log_p).sum(-1).mean(-1)  # (C,)
    return (cross_entropy - entropy_coef * entropy).sum(), cross_entropy, entropy


def critic_loss(
    critic: DistributionalCritic,
    next_actor: nn.Module,
    batch: TensorDict,
    alpha: torch.Tensor,
    gamma: float,
    entropy_coef: float = 0.005,
) -> TensorDict:
    """Distributional CrossQ loss with DIME's entropy-shifted target (docs/algorithm.md §2.2).

    ``next_actor`` samples a' ~ π(·|s') with its bound log π̂(a'|s') (no gradient). The critic runs one
    joint train-mode pass over (s, a) and (s', a'); the target is built from the detached (s', a') half.
    """
    obs, action = batch["observation"], batch["action"]
    next_obs = batch["next", "observation"]
    reward = batch["next", "reward"].reshape(-1)  # (B, 1) -> (B,)
    terminated = batch["next", "terminated"].reshape(-1)  # (B, 1) -> (B,)
    with torch.no_grad():
        nxt = next_actor(next_obs)
    logits, next_logits = critic.joint(obs, action, next_obs, nxt.action)  # 2 × (C, B, K)
    with torch.no_grad():
        target = soft_distributional_target(
            full_precision(next_logits).softmax(-1), reward, terminated, nxt.log_prob, alpha, gamma,
            critic.support, critic.v_min, critic.v_max,
        )
    loss, cross_entropy, entropy = categorical_cross_entropy(logits, target, entropy_coef)
    return TensorDict(
        loss_critic=loss,
        critic_cross_entropy=cross_entropy.mean().detach(),
        critic_entropy=entropy.mean().detach(),
        q_mean=critic.q_values(full_precision(logits.detach())).mean(),
        target_q_mean=(target * critic.support).sum(-1).mean(),
        next_log_prob_mean=nxt.log_prob.mean(),
        batch_size=[],
    )


def actor_loss(
    actor: nn.Module, critic: DistributionalCritic, obs: torch.Tensor, alpha: torch.Tensor, freeze_critic: bool = True
) -> TensorDict:
    """L_π = mean_b[−Q̄(s, a) + α log π̂(a|s)], a ~ π_θ(·|s) reparameterised (docs/algorithm.md §1.7).

    Q̄ is the mean over critics of Σ_j p_j z_j, with the critic frozen (running statistics, detached
    parameters): gradients reach the actor only. ``running_cost`` (detached mean) feeds the temperature.
    ``freeze_critic=False``: the caller has put the critic in eval mode and differentiates with respect to the
    actor's parameters only (program.py's one-program step).
    """
    out = actor(obs)
    with critic.frozen() if freeze_critic else contextlib.nullcontext():
        q = critic.q_values(full_precision(critic(obs, out.action))).mean(0)  # (C, B) -> (B,)
    loss = (-q + alpha * out.log_prob).mean()
    return TensorDict(
        loss_actor=loss,
        policy_q_mean=q.detach().mean(),  # Q of fresh actions; critic_loss's q_mean is Q of the replayed ones
        log_prob=out.log_prob.detach().mean(),
        running_cost=out.running_cost.detach().mean(),
        terminal_cost=out.terminal_cost.detach().mean(),
        batch_size=[],
    )


def temperature_loss(temperature: Temperature, statistic: torch.Tensor) -> TensorDict:
    """L_α = −α (statistic − target) (docs/algorithm.md §3); ``statistic`` is the actor batch's mean running cost."""
    return TensorDict(
        loss_alpha=temperature.loss(statistic),
        alpha=temperature.alpha(),
        batch_size=[],
    )
