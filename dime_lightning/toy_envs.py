"""Multimodal toy tasks where a diffusion policy's expressiveness is visible (Gymnasium envs).

- ``MultimodalBandit-v0``: one step, 2-D action in [−1, 1]², reward = the highest of 4 equal Gaussian bumps
  at (±0.5, ±0.5): four equally good actions. The observation is a constant.
- ``MultiGoal-v0``: a 2-D point mass starting near the origin, velocity actions, 4 equally good goals at
  (±2, 0) and (0, ±2) (the classic MaxEnt-RL multimodality demo, at unit scale). Reward: −0.1·|a|² − 0.5 ·
  (distance to the nearest goal), +10 on reaching a goal (the episode terminates); time limit 30 steps.

``register_toy_envs()`` registers both ids; ``envs.py`` calls it before reading an env id (no import-time
registration).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

BANDIT_MODES = np.array([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]], dtype=np.float32)
BANDIT_WIDTH = 0.15
GOALS = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]], dtype=np.float32)
GOAL_RADIUS = 0.25
TOY_ENV_IDS = ("MultimodalBandit-v0", "MultiGoal-v0")


def bandit_reward(action: np.ndarray) -> np.ndarray:
    """max_k exp(−|a − m_k|² / (2 w²)) for actions (..., 2)."""
    sq_dist = ((np.asarray(action)[..., None, :] - BANDIT_MODES) ** 2).sum(-1)  # (..., 4)
    return np.exp(-sq_dist / (2 * BANDIT_WIDTH**2)).max(-1)


def nearest_mode(points: np.ndarray, modes: np.ndarray, radius: float) -> np.ndarray:
    """Index of the nearest mode for each point (..., 2), or −1 when it is farther than ``radius``."""
    dist = np.linalg.norm(np.asarray(points)[..., None, :] - modes, axis=-1)  # (..., M)
    index = dist.argmin(-1)
    return np.where(dist.min(-1) <= radius, index, -1)


def mode_coverage(points: np.ndarray, modes: np.ndarray, radius: float) -> np.ndarray:
    """Fraction of ``points`` assigned to each mode (points farther than ``radius`` from all count for none)."""
    index = nearest_mode(points, modes, radius)
    return np.array([(index == k).mean() for k in range(len(modes))])


class MultimodalBandit(gym.Env):
    metadata = {"render_modes": []}  # noqa: RUF012 (the Gymnasium convention)

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        reward = float(bandit_reward(np.clip(action, -1.0, 1.0)))
        return np.zeros(1, dtype=np.float32), reward, True, False, {}


class MultiGoal(gym.Env):
    metadata = {"render_modes": []}  # noqa: RUF012 (the Gymnasium convention)

    def __init__(self, max_speed: float = 0.3, start_noise: float = 0.1) -> None:
        self.max_speed = max_speed
        self.start_noise = start_noise
        self.observation_space = spaces.Box(-4.0, 4.0, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.position = np.zeros(2, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position = self.np_random.normal(0.0, self.start_noise, size=2).astype(np.float32)
        return self.position.copy(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        self.position = np.clip(self.position + self.max_speed * action, -4.0, 4.0).astype(np.float32)
        distance = float(np.linalg.norm(GOALS - self.position, axis=-1).min())
        reached = distance <= GOAL_RADIUS
        reward = -0.1 * float((action**2).sum()) - 0.5 * distance + (10.0 if reached else 0.0)
        return self.position.copy(), reward, reached, False, {}


def register_toy_envs() -> None:
    if "MultimodalBandit-v0" not in gym.registry:
        gym.register("MultimodalBandit-v0", entry_point=MultimodalBandit)  # terminates after 1 step
    if "MultiGoal-v0" not in gym.registry:
        gym.register("MultiGoal-v0", entry_point=MultiGoal, max_episode_steps=30)
