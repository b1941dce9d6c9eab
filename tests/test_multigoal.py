"""MultiGoalHaarnoja-v0 (the standard multi-goal task) as defined, and the goal-coverage measures."""

from __future__ import annotations

from types import SimpleNamespace

import gymnasium
import numpy as np
import pytest
import torch
from torch import nn

from dime_lightning.analysis import coverage_summary, final_positions, point_rollouts
from dime_lightning.envs import make_env
from dime_lightning.toy_envs import HAARNOJA_GOALS, MultiGoalHaarnoja, haarnoja_reward, register_toy_envs


def env_at(position, reward_scale: float = 1.0) -> MultiGoalHaarnoja:
    env = MultiGoalHaarnoja(reward_scale=reward_scale)
    env.reset(seed=0)
    env.position = np.asarray(position, dtype=np.float32)
    return env


def step(env: MultiGoalHaarnoja, action):
    return env.step(np.asarray(action, dtype=np.float32))


def test_start_distribution_is_normal_around_the_origin_with_std_0_1():
    env = MultiGoalHaarnoja()
    starts = np.stack([env.reset(seed=seed)[0] for seed in range(2000)])
    assert np.abs(starts.mean(0)).max() < 0.01
    assert starts.std(0) == pytest.approx([0.1, 0.1], abs=0.006)
    assert env.observation_space.contains(starts[0]) and env.action_space.shape == (2,)


def test_dynamics_add_the_velocity_and_clip_to_the_box():
    obs, *_ = step(env_at([0.5, -1.0]), [0.3, -0.7])
    assert np.allclose(obs, [0.8, -1.7])
    obs, *_ = step(env_at([6.5, -6.8]), [1.0, -1.0])  # leaves the box: clipped to [-7, 7]²
    assert np.allclose(obs, [7.0, -7.0])
    obs, *_ = step(env_at([0.0, 0.0]), [3.0, -2.0])  # actions are clipped to [-1, 1]²
    assert np.allclose(obs, [1.0, -1.0])


def test_reward_at_known_states():
    assert step(env_at([0.0, 0.0]), [0.0, 0.0])[1] == pytest.approx(-25.0)  # min distance² = 25
    assert step(env_at([0.0, 0.0]), [0.5, 0.0])[1] == pytest.approx(-30 * 0.25 - 25.0)  # −30|a|², s before the step
    assert step(env_at([0.0, 0.0]), [0.6, -0.8])[1] == pytest.approx(-30.0 - 25.0)
    assert step(env_at([2.0, 1.0]), [0.0, 0.0])[1] == pytest.approx(-(9.0 + 1.0))  # nearest goal (5, 0)
    assert step(env_at([-1.0, 3.0]), [0.0, 0.0])[1] == pytest.approx(-(1.0 + 4.0))  # nearest goal (0, 5)
    points = np.array([[0.0, 0.0], [2.0, 1.0]])
    assert np.allclose(haarnoja_reward(points, np.array([[0.5, 0.0], [0.0, 0.0]])), [-32.5, -10.0])


def test_reaching_within_distance_1_terminates_with_the_bonus():
    _, reward, terminated, truncated, _ = step(env_at([3.5, 0.0]), [0.5, 0.0])  # lands at distance 1.0
    assert terminated and not truncated
    assert reward == pytest.approx(-30 * 0.25 - 1.5**2 + 10.0)
    _, reward, terminated, _, _ = step(env_at([3.5, 0.0]), [0.4, 0.0])  # distance 1.1: goes on
    assert not terminated and reward == pytest.approx(-30 * 0.16 - 1.5**2)
    for goal in HAARNOJA_GOALS:  # all four goals terminate
        assert step(env_at(goal * 0.9), [0.0, 0.0])[2]


def test_horizon_is_30_steps_and_truncates():
    env = make_env("MultiGoalHaarnoja-v0", seed=0)
    rollout = env.rollout(100, lambda td: td.set("action", torch.zeros(2)))  # standing still never reaches a goal
    assert rollout.shape[0] == 30
    assert bool(rollout["next", "truncated"][-1]) and not bool(rollout["next", "terminated"].any())
    env.close()


def test_registered_id_scales_every_reward_by_0_1():
    register_toy_envs()
    env = gymnasium.make("MultiGoalHaarnoja-v0")
    assert env.unwrapped.reward_scale == 0.1 and env.spec.max_episode_steps == 30
    env.reset(seed=0)
    env.unwrapped.position = np.array([3.5, 0.0], dtype=np.float32)
    scaled = env.step(np.array([0.5, 0.0], dtype=np.float32))[1]
    unscaled = step(env_at([3.5, 0.0]), [0.5, 0.0])[1]
    assert scaled == pytest.approx(0.1 * unscaled) and unscaled > 0  # the +10 bonus is scaled too
    with pytest.raises(ValueError, match="reward_scale must be > 0"):
        MultiGoalHaarnoja(reward_scale=0.0)


class ConstantVelocity(nn.Module):
    """A stand-in actor that always takes the same action."""

    def __init__(self, action) -> None:
        super().__init__()
        self.action = nn.Parameter(torch.tensor(action), requires_grad=False)

    def forward(self, obs: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(action=self.action.expand(obs.shape[0], 2))


def test_point_rollouts_follow_the_env_and_stop_at_termination():
    paths = point_rollouts(ConstantVelocity([0.0, 1.0]), episodes=5, seed=3)  # straight up to (0, 5)
    lengths = (~np.isnan(paths[..., 0])).sum(1) - 1  # steps per episode; NaN after the end
    assert set(lengths) <= {4, 5} and paths.shape == (5, lengths.max() + 1, 2)  # |s − (0, 5)| ≤ 1 after 4 or 5
    assert np.allclose(paths[:, 1:5, 1] - paths[:, :4, 1], 1.0, atol=1e-5)
    assert np.allclose(paths[:, 4, 1], paths[:, 0, 1] + 4.0, atol=1e-5)
    summary = coverage_summary(final_positions(paths))
    assert summary == {"per_goal": [0.0, 1.0, 0.0, 0.0], "goals_reached": 1, "goals_covered": 1, "none": 0.0}
    still = point_rollouts(ConstantVelocity([0.0, 0.0]), episodes=3)
    assert still.shape == (3, 31, 2) and coverage_summary(final_positions(still))["none"] == 1.0


def test_coverage_summary_counts_goals_and_misses():
    ends = np.concatenate([np.repeat(HAARNOJA_GOALS[:1] * 0.85, 50, 0),  # within 1 of (5, 0)
                           np.repeat(HAARNOJA_GOALS[2:3], 45, 0),
                           np.repeat(HAARNOJA_GOALS[3:4] * 0.7, 5, 0)])  # 1.5 from (0, −5): none
    ends = np.concatenate([ends, HAARNOJA_GOALS[1:2]])  # one rollout at (0, 5)
    summary = coverage_summary(ends)
    assert np.allclose(summary["per_goal"], np.array([50, 1, 45, 0]) / 101, atol=1e-4)
    assert summary["goals_reached"] == 3 and summary["goals_covered"] == 2
    assert summary["none"] == pytest.approx(5 / 101, abs=1e-4)
    nan_padded = np.array([[[0, 0], [1, 0], [np.nan, np.nan]], [[0, 0], [0, 1], [0, 2]]], dtype=float)
    assert np.array_equal(final_positions(nan_padded), [[1, 0], [0, 2]])


def test_direction_shares_assign_actions_to_the_nearest_goal_direction():
    from dime_lightning.analysis import direction_shares

    actions = np.array([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.0], [-0.9, -0.2], [0.2, -1.0], [1.0, -0.5], [-1.0, 0.9]])
    assert np.allclose(direction_shares(actions), np.array([2, 1, 3, 1]) / 7)  # (−1, 0.9) is nearer 180° than 90°


def test_coverage_benchmark_skips_recorded_runs_and_tabulates(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multigoal_coverage.py"
    spec = importlib.util.spec_from_file_location("multigoal_coverage", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = {"env_steps": 300, "train_wall_s": 60.0, "episodes": 100, "per_goal": [0.5, 0.0, 0.5, 0.0],
              "goals_reached": 2, "goals_covered": 2, "none": 0.0, "first_action_toward_goal": [0.5, 0, 0.5, 0],
              "mean_length": 6.0, "final_alpha": 0.3}
    runs = [{"policy": p, "alpha": a, "seed": 0, **record} for p in ("DIME", "Gaussian") for a in ("auto", "0.3")]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"runs": runs}))
    out = bench.main(["--alphas", "0.3", "--seeds", "0", "--steps", "300", "--results", str(results),
                      "--workdir", str(tmp_path / "runs")])  # everything recorded: nothing is trained
    assert "4 runs found" in capsys.readouterr().out and len(out["runs"]) == 4
    assert not (tmp_path / "runs").exists()
    table = bench.markdown_table(out).splitlines()
    assert len(table) == 6 and table[2].startswith("| DIME | auto | 0 | 0.50 / 0.00 / 0.50 / 0.00 | 2 / 2 |")
    with pytest.raises(SystemExit, match="must be > 0"):
        bench.main(["--alphas", "0", "--results", str(results)])
