"""Multimodal toy tasks where a diffusion policy's expressiveness is visible (Gymnasium envs).

- ``MultimodalBandit-v0``: one step, 2-D action in [−1, 1]², reward = the highest of 4 equal Gaussian bumps
  at (±0.5, ±0.5): four equally good actions. The observation is a constant.
- ``MultiGoal-v0``: a 2-D point mass starting near the origin, velocity actions, 4 equally good goals at
  (±2, 0) and (0, ±2) (the classic MaxEnt-RL multimodality demo, at unit scale). Reward: −0.1·|a|² − 0.5 ·
  (distance to the nearest goal), +10 on reaching a goal (the episode terminates); time limit 30 steps.
- ``MultiGoalHaarnoja-v0``: the standard multi-goal task of soft Q-learning (Haarnoja et al. 2017, "Reinforcement
  Learning with Deep Energy-Based Policies", §6.1), as defined there: position s ∈ [−7, 7]², velocity action
  a ∈ [−1, 1]², s' = clip(s + a, −7, 7) (no noise), start s_0 ~ N(0, 0.1² I), goals at (±5, 0) and (0, ±5),
  reward r = −30·|a|² − min_g |s − g|² (s: the state the action is taken in), plus 10 when |s' − g| ≤ 1 for a
  goal g, which terminates the episode; time limit 30 steps. The registered id multiplies r by
  ``reward_scale = 0.1``, the reward scale of the original training (the CLI has no reward-scale option).

``register_toy_envs()`` registers all of ``TOY_ENV_IDS``; ``envs.py`` calls it before reading an env id (no
import-time registration).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from dime_lightning.errors import BadInputError

BANDIT_MODES = np.array([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]], dtype=np.float32)
BANDIT_WIDTH = 0.15
GOALS = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]], dtype=np.float32)
GOAL_RADIUS = 0.25
HAARNOJA_GOALS = np.array([[5.0, 0.0], [0.0, 5.0], [-5.0, 0.0], [0.0, -5.0]], dtype=np.float32)
HAARNOJA_GOAL_RADIUS = 1.0
HAARNOJA_BOX = 7.0
HAARNOJA_REWARD_SCALE = 0.1
TOY_ENV_IDS = ("MultimodalBandit-v0", "MultiGoal-v0", "MultiGoalHaarnoja-v0")


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


def haarnoja_reward(position: np.ndarray, action: np.ndarray) -> np.ndarray:
    """−30·|a|² − min_g |s − g|² (unscaled, without the goal bonus) for positions and actions (..., 2)."""
    sq_dist = ((np.asarray(position)[..., None, :] - HAARNOJA_GOALS) ** 2).sum(-1)  # (..., 4)
    return -30.0 * (np.asarray(action) ** 2).sum(-1) - sq_dist.min(-1)


class MultiGoalHaarnoja(gym.Env):
    """The multi-goal task of Haarnoja et al. (2017) (see the module docstring).

    Args:
        reward_scale: factor applied to every reward, goal bonus included (> 0; the registered id uses 0.1).
        start_std: standard deviation of the start position around the origin, in position units (≥ 0).
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (the Gymnasium convention)

    def __init__(self, reward_scale: float = HAARNOJA_REWARD_SCALE, start_std: float = 0.1) -> None:
        if not reward_scale > 0:
            raise BadInputError(f"MultiGoalHaarnoja: reward_scale must be > 0, got {reward_scale}")
        if not start_std >= 0:
            raise BadInputError(f"MultiGoalHaarnoja: start_std must be >= 0, got {start_std}")
        self.reward_scale = reward_scale
        self.start_std = start_std
        self.observation_space = spaces.Box(-HAARNOJA_BOX, HAARNOJA_BOX, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.position = np.zeros(2, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position = self.np_random.normal(0.0, self.start_std, size=2).astype(np.float32)
        return self.position.copy(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        reward = float(haarnoja_reward(self.position, action))
        self.position = np.clip(self.position + action, -HAARNOJA_BOX, HAARNOJA_BOX).astype(np.float32)
        reached = bool(np.linalg.norm(HAARNOJA_GOALS - self.position, axis=-1).min() <= HAARNOJA_GOAL_RADIUS)
        reward += 10.0 if reached else 0.0
        return self.position.copy(), self.reward_scale * reward, reached, False, {}


_REGISTRATIONS = {
    "MultimodalBandit-v0": {"entry_point": MultimodalBandit},  # terminates after 1 step
    "MultiGoal-v0": {"entry_point": MultiGoal, "max_episode_steps": 30},
    "MultiGoalHaarnoja-v0": {"entry_point": MultiGoalHaarnoja, "max_episode_steps": 30},
}


def register_toy_envs() -> None:
    for env_id in TOY_ENV_IDS:
        if env_id not in gym.registry:
            gym.register(env_id, **_REGISTRATIONS[env_id])
