"""A test env: Pendulum whose observation carries the id of the process that steps it (last entry), so a test
can tell which worker collected a transition. Use as env id ``pid_env:PidPendulum-v0`` (PYTHONPATH=tests)."""

import os

import gymnasium as gym
import numpy as np


class ProcessIdObservation(gym.ObservationWrapper):
    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        low = np.append(env.observation_space.low, 0.0).astype(np.float32)
        high = np.append(env.observation_space.high, 2.0**22).astype(np.float32)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)

    def observation(self, observation):
        return np.append(observation, float(os.getpid() % 2**22)).astype(np.float32)


if "PidPendulum-v0" not in gym.registry:
    gym.register("PidPendulum-v0", entry_point=lambda **kwargs: ProcessIdObservation(gym.make("Pendulum-v1")))
