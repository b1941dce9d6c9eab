"""Test envs: Pendulum whose reward becomes NaN after some steps (NaNRewardPendulum-v0; NaNRewardOnRank1Pendulum-v0
only in the DDP process of local rank 1). Importing this module registers both."""

import os

import gymnasium as gym


class NaNRewardAfter(gym.Wrapper):
    def __init__(self, env: gym.Env, after: int = 150) -> None:
        super().__init__(env)
        self.after = after
        self.steps = 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        return obs, float("nan") if self.steps > self.after else reward, terminated, truncated, info


if "NaNRewardPendulum-v0" not in gym.registry:
    gym.register("NaNRewardPendulum-v0", entry_point=lambda **kwargs: NaNRewardAfter(gym.make("Pendulum-v1")))


class NaNRewardOnRank1(NaNRewardAfter):
    """NaN rewards after ``after`` steps only in the DDP process of local rank 1 (Lightning sets LOCAL_RANK)."""

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        if os.environ.get("LOCAL_RANK", "0") != "1" and reward != reward:
            reward = 0.0
        return obs, reward, terminated, truncated, info


if "NaNRewardOnRank1Pendulum-v0" not in gym.registry:
    gym.register("NaNRewardOnRank1Pendulum-v0",
                 entry_point=lambda **kwargs: NaNRewardOnRank1(gym.make("Pendulum-v1"), after=60))
