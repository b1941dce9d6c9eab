"""A test env: Pendulum whose reward becomes NaN after 150 steps (import registers NaNRewardPendulum-v0)."""

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
