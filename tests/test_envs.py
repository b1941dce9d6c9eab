"""envs.py: env ids, action mapping, terminal vs truncated, float32 observations."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tensordict import TensorDict

from dime_lightning.envs import EnvIdError, check_env_id, env_spec, make_env


def test_pendulum_spec_and_action_mapping():
    spec = env_spec("Pendulum-v1")
    assert (spec.obs_dim, spec.action_dim) == (3, 1)
    env = make_env("Pendulum-v1", seed=0)
    assert torch.equal(env.action_spec.space.low, -torch.ones(1))
    assert torch.equal(env.action_spec.space.high, torch.ones(1))
    assert env.observation_spec["observation"].dtype == torch.float32
    # the policy's [-1, 1] maps affinely onto the env's [-2, 2]
    scaling = next(t for t in env.transform if type(t).__name__ == "ActionScaling")
    mapped = scaling.inv(TensorDict(action=torch.tensor([[-1.0], [0.0], [0.5], [1.0]]), batch_size=[4]))
    assert torch.allclose(mapped["action"].squeeze(-1), torch.tensor([-2.0, 0.0, 1.0, 2.0]))
    env.close()


def test_time_limit_truncates_and_never_terminates():
    env = make_env("Pendulum-v1", seed=0)
    rollout = env.rollout(250, break_when_any_done=True)
    assert rollout.shape[0] == 200
    assert rollout["next", "truncated"][-1].item() and not rollout["next", "terminated"].any()
    episode_return = rollout["next", "reward"].sum().item()
    assert rollout["next", "episode_reward"][-1].item() == pytest.approx(episode_return, rel=1e-5)
    env.close()


def test_falling_hopper_terminates():
    env = make_env("Hopper-v5", seed=0)
    rollout = env.rollout(1000, break_when_any_done=True)  # random actions: the hopper falls quickly
    assert rollout.shape[0] < 1000
    assert rollout["next", "terminated"][-1].item() and not rollout["next", "truncated"][-1].item()
    assert rollout["observation"].dtype == torch.float32
    env.close()


@pytest.mark.parametrize("env_id", ["HalfCheetah-v5", "Ant-v5"])
def test_mujoco_v5_dimensions(env_id):
    spec = env_spec(env_id)
    assert (spec.obs_dim, spec.action_dim) == {"HalfCheetah-v5": (17, 6), "Ant-v5": (105, 8)}[env_id]


@pytest.mark.parametrize(("env_id", "message"), [
    ("NoSuchEnv-v0", "unknown env id 'NoSuchEnv-v0'"),
    ("CartPole-v1", "continuous action space"),
    ("dm_control/walker", "dm_control/<domain>-<task>"),
    ("", "non-empty"),
])
def test_bad_env_ids_name_the_problem(env_id, message):
    with pytest.raises(EnvIdError, match=message):
        make_env(env_id) if env_id else check_env_id(env_id)


@pytest.mark.skipif(importlib.util.find_spec("dm_control") is not None, reason="dm_control is installed")
def test_dmc_without_dm_control_says_how_to_install():
    with pytest.raises(EnvIdError, match=r"pip install 'dime-lightning\[dmc\]'"):
        check_env_id("dm_control/cheetah-run")
