"""TanhGaussianActor contract, the multimodal toy tasks, and their mode-coverage measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dime_lightning.actor import DiffusionActor
from dime_lightning.envs import make_env
from dime_lightning.errors import BadInputError
from dime_lightning.gaussian import TanhGaussianActor
from dime_lightning.module import DIMEModule
from dime_lightning.policy import Actor, SamplesFromForward, check_actor, tanh_log_det_jacobian
from dime_lightning.toy_envs import BANDIT_MODES, GOALS, bandit_reward, mode_coverage


def test_gaussian_actor_has_the_diffusion_actor_contract():
    torch.manual_seed(0)
    gaussian, diffusion = TanhGaussianActor(5, 3, hidden_dim=16), DiffusionActor(5, 3, hidden_dim=16)
    obs = torch.randn(7, 5)
    for actor in (gaussian, diffusion):
        out = actor(obs, return_trajectory=True)
        assert out.action.shape == out.pre_tanh.shape == (7, 3)
        assert out.log_prob.shape == out.running_cost.shape == out.terminal_cost.shape == (7,)
        assert out.action.abs().max() < 1 and out.trajectory.shape[1:] == (7, 3)
        assert actor.act(obs[0]).shape == (3,) and isinstance(actor.diagnostics(), dict)
    assert torch.equal(gaussian(obs).terminal_cost, torch.zeros(7))


def test_gaussian_log_prob_is_the_exact_squashed_density():
    torch.manual_seed(1)
    actor = TanhGaussianActor(2, 2, hidden_dim=8).double()
    obs = torch.randn(4, 2, dtype=torch.float64)
    noise = torch.randn(1, 4, 2, dtype=torch.float64)
    out = actor(obs, noise=noise)
    mean, log_std = actor.distribution_parameters(obs)
    normal = torch.distributions.Normal(mean, log_std.exp())
    expected = normal.log_prob(out.pre_tanh).sum(-1) - tanh_log_det_jacobian(out.pre_tanh)
    assert torch.allclose(out.log_prob, expected)
    assert torch.allclose(out.running_cost, out.log_prob)


def test_gaussian_entropy_estimate_matches_the_analytic_entropy_before_squashing():
    torch.manual_seed(2)
    actor = TanhGaussianActor(1, 2, hidden_dim=8)
    obs = torch.zeros(100_000, 1)
    with torch.no_grad():
        out = actor(obs)
        _, log_std = actor.distribution_parameters(obs[:1])
    pre_squash_entropy = -(out.log_prob + tanh_log_det_jacobian(out.pre_tanh)).mean().item()
    analytic = (0.5 * math.log(2 * math.pi * math.e) + log_std).sum().item()
    assert pre_squash_entropy == pytest.approx(analytic, abs=0.02)


def test_bandit_has_four_equal_peaks_and_one_step_episodes():
    assert np.allclose(bandit_reward(BANDIT_MODES), 1.0)
    assert bandit_reward(np.zeros(2)) < 1e-3
    env = make_env("MultimodalBandit-v0", seed=0)
    rollout = env.rollout(5)
    assert rollout.shape[0] == 1 and bool(rollout["next", "terminated"].all())
    env.close()


def test_multigoal_reaching_a_goal_terminates_with_the_bonus():
    from dime_lightning.toy_envs import MultiGoal

    env = MultiGoal()
    obs, _ = env.reset(seed=0)
    rewards, terminated = [], False
    for _ in range(30):  # full speed towards the goal at (+2, 0)
        obs, reward, terminated, _, _ = env.step(np.array([1.0, 0.0], dtype=np.float32))
        rewards.append(reward)
        if terminated:
            break
    assert terminated and rewards[-1] > 5.0 and all(r < 0 for r in rewards[:-1])
    assert np.linalg.norm(obs - GOALS[0]) <= 0.25
    rollout = make_env("MultiGoal-v0", seed=0).rollout(100)  # random actions: the 30-step limit truncates
    assert rollout.shape[0] == 30 and bool(rollout["next", "truncated"][-1])


def test_mode_coverage_counts_points_near_each_mode():
    points = np.concatenate([np.repeat(BANDIT_MODES[:1], 60, 0), np.repeat(BANDIT_MODES[2:3], 30, 0),
                             np.zeros((10, 2))])
    coverage = mode_coverage(points, BANDIT_MODES, radius=0.25)
    assert np.allclose(coverage, [0.6, 0.0, 0.3, 0.0])


@pytest.mark.parametrize("gaussian", [False, True], ids=["DIME", "Gaussian"])
def test_multigoal_haarnoja_config_builds_through_the_cli(gaussian, tmp_path, monkeypatch):
    from pathlib import Path

    from dime_lightning.fit import build_cli

    conf = Path(__file__).resolve().parents[1] / "conf"
    monkeypatch.chdir(tmp_path)
    overlay = ["--config", str(conf / "gaussian.yaml")] if gaussian else []
    cli = build_cli(["--config", str(conf / "multigoal_haarnoja.yaml"), "--config", str(conf / "smoke.yaml"),
                     *overlay, "--model.temperature.init_args.mode", "fixed",
                     "--model.temperature.init_args.init_alpha", "0.3",
                     "--mlflow.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "--checkpoint.dirpath", str(tmp_path / "ckpt")])
    model = cli.model
    assert isinstance(model.actor, TanhGaussianActor if gaussian else DiffusionActor)
    assert model.temperature.mode == "fixed" and model.temperature.alpha().item() == pytest.approx(0.3)
    assert (model.critic.v_min, model.critic.v_max) == (-100.0, 10.0)
    assert cli.datamodule.spec.env_id == "MultiGoalHaarnoja-v0"
    assert (cli.datamodule.spec.obs_dim, cli.datamodule.spec.action_dim) == (2, 2)


class _NoDiagnostics(SamplesFromForward, torch.nn.Module):  # forward and act, but no diagnostics
    def __init__(self, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.inner = TanhGaussianActor(obs_dim, action_dim, hidden_dim=8)

    def forward(self, obs, return_trajectory=False, noise=None):
        return self.inner(obs, return_trajectory, noise)


class _NoForward(torch.nn.Module):  # nn.Module's forward is not one
    def __init__(self, obs_dim: int, action_dim: int) -> None:
        super().__init__()

    def act(self, obs):
        return obs

    def diagnostics(self):
        return {}


@pytest.mark.parametrize(("actor", "missing"), [(_NoDiagnostics, "lacks diagnostics"), (_NoForward, "lacks forward")])
def test_an_actor_without_the_contract_is_refused_naming_what_is_missing(actor, missing):
    with pytest.raises(BadInputError, match=f"model.actor: {actor.__name__} {missing} of the actor contract"):
        DIMEModule(obs_dim=3, action_dim=1, actor=actor)
    for built in (DiffusionActor(3, 1, num_steps=2, hidden_dim=8), TanhGaussianActor(3, 1, hidden_dim=8)):
        assert isinstance(check_actor(built), Actor)  # the project's actors keep it
