"""DMC env construction: a DMC task builds and steps; MuJoCo 4 beside dm_control and a missing dm_control are
named with the fix."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from dime_lightning.envs import EnvIdError, check_env_id, make_env

needs_dmc = pytest.mark.skipif(importlib.util.find_spec("dm_control") is None, reason="needs the dmc extra")


@needs_dmc
def test_pendulum_swingup_builds_with_a_flat_observation_and_a_1000_step_limit():
    env = make_env("dm_control/pendulum-swingup", seed=0)
    try:
        assert env.observation_spec["observation"].shape[-1] == 3 and env.action_spec.shape[-1] == 1
        rollout = env.rollout(1100, break_when_any_done=True)
        assert rollout.shape[0] == 1000 and bool(rollout["next", "truncated"][-1])
        assert not rollout["next", "terminated"].any()  # the time limit truncates, it never terminates
    finally:
        env.close()


@needs_dmc
def test_mujoco_4_is_named_with_the_fix(monkeypatch):
    import mujoco

    monkeypatch.setattr(mujoco, "__version__", "4.0.0")
    with pytest.raises(EnvIdError, match=r"does not work with MuJoCo 4\.0\.0.*mujoco-core mujoco-studio"):
        check_env_id("dm_control/cheetah-run")


def test_missing_dm_control_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dm_control", None)  # makes `from dm_control import suite` raise ImportError
    with pytest.raises(EnvIdError, match=r"needs dm_control, which is not installed: pip install 'dime-lightning\[dmc"):
        check_env_id("dm_control/cheetah-run")
