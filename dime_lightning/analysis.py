"""Look inside a trained policy: load it, sample its action distribution, follow the denoising chain, plot.

The notebooks in ``notebooks/`` are thin wrappers around these functions (so tests reach the logic)::

    policy = load_policy("checkpoints/<run id>/final.ckpt")        # or an MLflow run id
    actions = sample_actions(policy.actor, obs, n=2000)            # (n, D) squashed actions in [-1, 1]
    chain = denoising_chain(policy.actor, obs, n=500)              # (N+1, n, D) x_0 (noise) .. x_N (pre-tanh)
    plot_pairwise_density(actions, dims=(0, 1)); plot_chain(chain)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from tensordict.nn import TensorDictModule
from torch import nn

from dime_lightning import checkpoint_schema as schema
from dime_lightning.actor import DiffusionActor
from dime_lightning.checkpointing import resolve_checkpoint
from dime_lightning.envs import make_env
from dime_lightning.errors import BadInputError, CheckpointError
from dime_lightning.gaussian import TanhGaussianActor
from dime_lightning.policy import check_actor
from dime_lightning.toy_envs import (
    BANDIT_MODES,
    GOAL_RADIUS,
    GOALS,
    HAARNOJA_BOX,
    HAARNOJA_GOAL_RADIUS,
    HAARNOJA_GOALS,
    mode_coverage,
    register_toy_envs,
)


@dataclass
class LoadedPolicy:
    actor: nn.Module
    env_id: str
    config: dict[str, Any]
    counters: schema.Counters
    path: Path

    @property
    def label(self) -> str:
        return type(self.actor).__name__.replace("TanhGaussianActor", "Gaussian").replace("DiffusionActor", "DIME")


# the project's actors under every name a stored config uses (jsonargparse stores the package-level export)
ACTOR_CLASSES: dict[str, type[nn.Module]] = {
    "dime_lightning.DiffusionActor": DiffusionActor,
    "dime_lightning.actor.DiffusionActor": DiffusionActor,
    "dime_lightning.gaussian.TanhGaussianActor": TanhGaussianActor,
}
PLAIN_VALUES = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    return isinstance(value, PLAIN_VALUES) or (isinstance(value, list | tuple) and all(map(_plain, value)))


def _actor_spec(spec: Any, path: Path, classes: Mapping[str, type[nn.Module]]) -> tuple[type[nn.Module], dict]:
    """The stored actor config → (a class from ``classes``, checked keyword arguments). The file only *names*
    a class; nothing it names is imported, and its arguments must be plain values the class accepts."""
    class_path = spec.get("class_path") if isinstance(spec, dict) else None
    if class_path not in classes:
        raise CheckpointError(f"checkpoint {path}: actor class {class_path!r} is not one this loader builds "
                              f"({', '.join(classes)}); pass actor_classes={{{class_path!r}: YourActor}} to "
                              "load_policy to build your own (a checkpoint never chooses the code that runs)")
    cls, init_args = classes[class_path], spec.get("init_args") or {}
    accepted = set(inspect.signature(cls).parameters) - {"obs_dim", "action_dim"}
    if not isinstance(init_args, dict):
        raise CheckpointError(f"checkpoint {path}: the actor's init_args are not a mapping")
    for key, value in init_args.items():
        if key not in accepted:
            raise CheckpointError(f"checkpoint {path}: {class_path} takes no argument {key!r} "
                                  f"(it takes {', '.join(sorted(accepted))})")
        if not _plain(value):
            raise CheckpointError(f"checkpoint {path}: actor argument {key} = {value!r} is not a plain value "
                                  "(number, string, boolean, null or a list of them)")
    return cls, init_args


def load_policy(source: str | Path, tracking_uri: str | None = None, device: str = "cpu",
                actor_classes: Mapping[str, type[nn.Module]] | None = None) -> LoadedPolicy:
    """Rebuild the actor of a checkpoint file, ``last`` or an MLflow run id (see ``--ckpt_path``).

    The checkpoint is data: its actor is built only from ``ACTOR_CLASSES`` (the project's actors) or the
    ``actor_classes`` the caller passes ({class path as stored: class}), with arguments checked against that
    class's signature; a checkpoint naming anything else is refused (``CheckpointError``)."""
    source = Path(source) / "final.ckpt" if Path(source).is_dir() else source
    path = resolve_checkpoint(str(source), None, tracking_uri).path
    checkpoint = schema.read_checkpoint(path)
    config = schema.config(checkpoint)
    if not config:
        raise CheckpointError(f"checkpoint {path} has no stored config (written by an older version?)")
    cls, init_args = _actor_spec((config.get("model") or {}).get("actor"), path,
                                 {**ACTOR_CLASSES, **(actor_classes or {})})
    dims = schema.dims(checkpoint)
    if not all(isinstance(d, int) and d >= 1 for d in dims):
        raise CheckpointError(f"checkpoint {path}: observation/action sizes {dims} are not positive integers")
    actor = check_actor(cls(*dims, **init_args), f"the actor of checkpoint {path}")
    state = {k[len("actor."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("actor.")}
    actor.load_state_dict(state)
    actor.to(device).eval()
    env_id = (config.get("data") or {}).get("env_id")
    return LoadedPolicy(actor, str(env_id), config, schema.counters(checkpoint), path)


def _as_batch(obs: Any, n: int, actor: nn.Module) -> torch.Tensor:
    device = next(actor.parameters()).device
    obs = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device).reshape(-1)
    return obs.expand(n, obs.shape[0])  # (obs_dim,) -> (n, obs_dim)


@torch.no_grad()
def sample_actions(actor: nn.Module, obs: Any, n: int = 2000, seed: int = 0) -> np.ndarray:
    """``n`` squashed actions (n, D) for one observation."""
    torch.manual_seed(seed)
    return actor(_as_batch(obs, n, actor)).action.cpu().numpy()


@torch.no_grad()
def denoising_chain(actor: nn.Module, obs: Any, n: int = 500, seed: int = 0) -> np.ndarray:
    """The chain x_0 (prior noise) … x_N (pre-tanh action) for ``n`` samples at one observation: (N+1, n, D)."""
    torch.manual_seed(seed)
    return actor(_as_batch(obs, n, actor), return_trajectory=True).trajectory.cpu().numpy()


@torch.no_grad()
def entropy_terms(actor: nn.Module, obs: Any, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean running cost, terminal cost, log π̂ and the entropy bound −E[log π̂] at one observation."""
    torch.manual_seed(seed)
    out = actor(_as_batch(obs, n, actor))
    return {"running_cost": out.running_cost.mean().item(), "terminal_cost": out.terminal_cost.mean().item(),
            "log_prob": out.log_prob.mean().item(), "entropy_bound": -out.log_prob.mean().item()}


def bandit_coverage(actions: np.ndarray, radius: float = 0.25) -> np.ndarray:
    """Fraction of MultimodalBandit actions within ``radius`` of each of the 4 optimal actions."""
    return mode_coverage(actions[:, :2], BANDIT_MODES, radius)


@torch.no_grad()
def multigoal_final_positions(actor: nn.Module, episodes: int = 100, seed: int = 0) -> np.ndarray:
    """End positions (episodes, 2) of stochastic MultiGoal-v0 rollouts."""
    torch.manual_seed(seed)
    env = make_env("MultiGoal-v0", seed=seed)
    device = next(actor.parameters()).device
    policy = TensorDictModule(lambda obs: actor.act(obs.to(device)).cpu(), ["observation"], ["action"])
    finals = [env.rollout(1000, policy, break_when_any_done=True)["next", "observation"][-1].numpy()
              for _ in range(episodes)]
    env.close()
    return np.stack(finals)


def goal_coverage(final_positions: np.ndarray, goals: np.ndarray = GOALS, radius: float = GOAL_RADIUS) -> np.ndarray:
    """Fraction of end positions within ``radius`` of each goal (MultiGoal-v0's goals by default)."""
    return mode_coverage(final_positions, goals, radius)


@torch.no_grad()
def point_rollouts(actor: nn.Module, env_id: str = "MultiGoalHaarnoja-v0", episodes: int = 100,
                   seed: int = 0) -> np.ndarray:
    """Positions (episodes, T + 1, 2) of stochastic rollouts of a 2-D point-mass toy env from its start
    distribution, NaN after an episode ends. One Gymnasium env per episode (seeds ``seed`` … ``seed +
    episodes − 1``), stepped together with one batched actor call per step; actions pass unscaled (the toy
    envs' action box is [−1, 1]²)."""
    import gymnasium

    torch.manual_seed(seed)
    register_toy_envs()
    envs = [gymnasium.make(env_id) for _ in range(episodes)]
    if not all(np.allclose(e.action_space.low, -1) and np.allclose(e.action_space.high, 1) for e in envs):
        raise BadInputError(f"point_rollouts: env {env_id!r} needs the action box [-1, 1]², has {envs[0].action_space}")
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])  # (episodes, 2)
    path, alive = [obs], np.ones(episodes, dtype=bool)
    device = next(actor.parameters()).device
    while alive.any():
        actions = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)).action.cpu().numpy()
        step = np.full_like(obs, np.nan)
        for i in np.flatnonzero(alive):
            step[i], _, terminated, truncated, _ = envs[i].step(actions[i])
            alive[i] = not (terminated or truncated)
        path.append(step)
        obs = np.where(np.isnan(step), obs, step)
    for env in envs:
        env.close()
    return np.stack(path, axis=1)  # (T + 1, episodes, 2) -> (episodes, T + 1, 2)


def final_positions(paths: np.ndarray) -> np.ndarray:
    """Last non-NaN position (episodes, 2) of each path (episodes, T + 1, 2)."""
    last = (~np.isnan(paths[..., 0])).sum(1) - 1  # (episodes,)
    return paths[np.arange(len(paths)), last]


def coverage_summary(final: np.ndarray, goals: np.ndarray = HAARNOJA_GOALS, radius: float = HAARNOJA_GOAL_RADIUS,
                     covered: float = 0.10) -> dict[str, Any]:
    """Share of end positions (episodes, 2) within ``radius`` of each goal, the number of goals reached by any
    rollout and by at least a share ``covered`` of them, and the share that reached none."""
    shares = mode_coverage(final, goals, radius)
    return {"per_goal": shares.round(4).tolist(), "goals_reached": int((shares > 0).sum()),
            "goals_covered": int((shares >= covered).sum()), "none": round(float(1.0 - shares.sum()), 4)}


def direction_shares(actions: np.ndarray, goals: np.ndarray = HAARNOJA_GOALS) -> np.ndarray:
    """Share of 2-D actions (n, 2) whose direction is closest to the direction of each goal from the origin."""
    angles = np.arctan2(actions[:, 1], actions[:, 0])[:, None] - np.arctan2(goals[:, 1], goals[:, 0])  # (n, G)
    nearest = np.abs(np.angle(np.exp(1j * angles))).argmin(-1)  # angle differences wrapped to (−π, π]
    return np.bincount(nearest, minlength=len(goals)) / len(actions)


# ---- plots --------------------------------------------------------------------------------------------------
def plot_marginals(actions: np.ndarray, label: str = "", axes=None, bins: int = 60):
    """One histogram per action dimension (density over [-1, 1])."""
    dims = actions.shape[-1]
    if axes is None:
        _, axes = plt.subplots(1, dims, figsize=(3 * dims, 2.6), squeeze=False)
        axes = axes[0]
    for d, ax in enumerate(axes):
        ax.hist(actions[:, d], bins=bins, range=(-1, 1), density=True, alpha=0.6, label=label or None)
        ax.set_xlabel(f"action[{d}]")
        ax.set_ylabel("density")
        if label:
            ax.legend(fontsize=8)
    return axes


def plot_pairwise_density(actions: np.ndarray, dims: tuple[int, int] = (0, 1), ax=None, title: str = "",
                          marks: np.ndarray | None = None, gridsize: int = 30):
    """Hexagon-binned density of two action dimensions (empty bins left white); ``marks`` (M, 2) are drawn as
    crosses (e.g. the optimal actions)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    bins = ax.hexbin(actions[:, dims[0]], actions[:, dims[1]], gridsize=gridsize, extent=(-1, 1, -1, 1),
                     mincnt=1, cmap="viridis")
    ax.figure.colorbar(bins, ax=ax, shrink=0.8, label="samples per bin")
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    if marks is not None:
        ax.scatter(marks[:, 0], marks[:, 1], marker="x", c="red", s=90, linewidths=2.5)
        title = f"{title} (red ×: optimal actions)" if title else "red ×: optimal actions"
    ax.set_xlabel(f"action[{dims[0]}]")
    ax.set_ylabel(f"action[{dims[1]}]")
    ax.set_aspect("equal")
    ax.set_title(title)
    return ax


def plot_chain(chain: np.ndarray, dims: tuple[int, int] = (0, 1), snapshots: int = 5, squash: bool = True,
               axes=None):
    """Scatter of the samples at ``snapshots`` steps from noise (step 0) to action (step N), tanh-squashed."""
    steps = np.linspace(0, chain.shape[0] - 1, snapshots).round().astype(int)
    if axes is None:
        _, axes = plt.subplots(1, snapshots, figsize=(3 * snapshots, 3), squeeze=False)
        axes = axes[0]
    points = np.tanh(chain) if squash else chain
    limit = 1.05 if squash else float(np.abs(chain).max())
    for ax, step in zip(axes, steps, strict=True):
        y = points[step, :, dims[1]] if chain.shape[-1] > 1 else np.zeros(chain.shape[1])
        ax.scatter(points[step, :, dims[0]], y, s=3, alpha=0.4)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_title(f"step {step}" + (" (noise)" if step == 0 else " (action)" if step == chain.shape[0] - 1 else ""))
        ax.set_xlabel(("tanh " if squash else "") + f"x[{dims[0]}]")
    axes[0].set_ylabel(("tanh " if squash else "") + f"x[{dims[1]}]")
    return axes


def plot_side_by_side(samples: dict[str, np.ndarray], dims: tuple[int, int] = (0, 1),
                      marks: np.ndarray | None = None, suptitle: str = ""):
    """Pairwise densities of several policies (e.g. {"DIME": …, "Gaussian": …}) in one figure."""
    fig, axes = plt.subplots(1, len(samples), figsize=(5.2 * len(samples), 4.4), squeeze=False,
                             layout="constrained")
    for ax, (label, actions) in zip(axes[0], samples.items(), strict=True):
        plot_pairwise_density(actions, dims, ax=ax, title=label, marks=marks)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def plot_point_rollouts(paths: np.ndarray, ax=None, title: str = "", goals: np.ndarray = HAARNOJA_GOALS,
                        radius: float = HAARNOJA_GOAL_RADIUS, box: float = HAARNOJA_BOX):
    """Rollout paths (episodes, T + 1, 2) over the contours of the state cost min_g |s − g|² (the reward at
    a = 0, unscaled), the goals' termination discs drawn in red; an end at a goal is a dot, elsewhere a cross."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    grid = np.linspace(-box, box, 141)
    xx, yy = np.meshgrid(grid, grid)
    cost = ((np.stack([xx, yy], -1)[..., None, :] - goals) ** 2).sum(-1).min(-1)  # (141, 141)
    contours = ax.contourf(xx, yy, cost, levels=np.arange(0, 55, 5), cmap="Greys", alpha=0.45)
    for k, goal in enumerate(goals):
        ax.add_patch(plt.Circle(goal, radius, facecolor=(0.84, 0.15, 0.16, 0.3), edgecolor="tab:red", lw=1.5,
                                label=f"goal (reached within {radius:g})" if k == 0 else None))
    ends = final_positions(paths)
    at_goal = np.linalg.norm(ends[:, None] - goals, axis=-1).min(-1) <= radius
    for path in paths:
        ax.plot(path[:, 0], path[:, 1], color="tab:blue", lw=0.7, alpha=0.5)
    ax.scatter(*ends[at_goal].T, s=10, color="tab:blue", zorder=3)
    ax.scatter(*ends[~at_goal].T, s=25, marker="x", color="black", zorder=3, label="ended at no goal")
    ax.scatter([0], [0], marker="*", s=120, color="gold", edgecolor="black", zorder=4, label="start")
    ax.set_xlim(-box, box)
    ax.set_ylim(-box, box)
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=7)
    return ax, contours


# ---- quick training for the notebooks -------------------------------------------------------------------------
def train_policy(configs: list[str | Path], workdir: str | Path, *overrides: str, tracking_uri: str | None = None,
                 timeout: float | None = None) -> Path:
    """Train through the real CLI (``python -m dime_lightning.fit``) in a subprocess; returns ``final.ckpt``.

    ``configs`` are YAML files applied in order; ``overrides`` are extra ``--key value`` arguments.
    """
    import subprocess
    import sys
    import time as _time

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    dirpath = workdir / f"run-{_time.time_ns()}"
    uri = tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    config_args = [arg for config in configs for arg in ("--config", str(Path(config).resolve()))]
    command = [sys.executable, "-m", "dime_lightning.fit", *config_args, *overrides,
               "--mlflow.tracking_uri", uri, "--checkpoint.dirpath", str(dirpath),
               "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"training failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return dirpath / "final.ckpt"
