"""Tests for the distributional CrossQ critic (docs/algorithm.md §2.1, §8 items 7 and 9)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dime_lightning.critic import BatchRenorm, DistributionalCritic, project_distribution
from dime_lightning.losses import soft_distributional_target


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _support(v_min: float, v_max: float, num_atoms: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.linspace(v_min, v_max, num_atoms, dtype=dtype)


def _target(
    probs: torch.Tensor,
    reward: float | torch.Tensor,
    gamma: float,
    terminated: bool,
    support: torch.Tensor,
    v_min: float,
    v_max: float,
    alpha: float = 0.0,
    log_prob: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """soft_distributional_target for next_probs (C, B, K) with scalar (broadcast) transition fields."""
    batch = probs.shape[1]
    dtype = probs.dtype
    return soft_distributional_target(
        probs,
        torch.as_tensor(reward, dtype=dtype).expand(batch),
        torch.full((batch,), terminated),
        torch.as_tensor(log_prob, dtype=dtype).expand(batch),
        torch.tensor(alpha, dtype=dtype),
        gamma,
        support,
        v_min,
        v_max,
    )


# ---------------------------------------------------------------------------------------------------------
# Item 7: C51 projection
# ---------------------------------------------------------------------------------------------------------


def test_item7_projection_rows_sum_to_one_for_any_shift() -> None:
    v_min, v_max, k = -10.0, 10.0, 21
    probs = torch.randn(3, 64, k, dtype=torch.float64).softmax(-1)
    # Shifted atoms spread well beyond the support on both sides (clipping active), plus exact grid points.
    shifted = torch.empty(3, 64, k, dtype=torch.float64).uniform_(-50.0, 50.0)
    shifted[0, :8] = _support(v_min, v_max, k, torch.float64)
    shifted[1, :4] = 1e6
    shifted[1, 4:8] = -1e6
    out = project_distribution(probs, shifted, v_min, v_max, k)
    assert out.shape == probs.shape
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 64, dtype=torch.float64), rtol=0, atol=1e-12)
    # Non-normalised input mass is preserved too (the projection is linear in probs).
    torch.testing.assert_close(
        project_distribution(2.5 * probs, shifted, v_min, v_max, k).sum(-1), 2.5 * probs.sum(-1)
    )


@pytest.mark.parametrize(
    ("v_min", "v_max", "k"), [(-200.0, 200.0, 101), (-1600.0, 1600.0, 101), (-10.0, 10.0, 5), (-1.0, 2.3, 7)]
)
def test_item7_projection_identity_on_grid(v_min: float, v_max: float, k: int) -> None:
    """r=0, γ=1, α=0, d=0 leaves every one-hot atom in place, including the end atoms j=0 and j=K−1."""
    support = _support(v_min, v_max, k, torch.float64)
    eye = torch.eye(k, dtype=torch.float64)  # row j = point mass at atom j
    # Directly, and through the target (which builds r + γ(1−d)(z − α logπ) = z itself).
    direct = project_distribution(eye, support.expand(k, k), v_min, v_max, k)
    via_target = _target(eye.unsqueeze(0), 0.0, 1.0, False, support, v_min, v_max, alpha=0.0, log_prob=3.0)
    for out in (direct, via_target):
        torch.testing.assert_close(out, eye, rtol=0, atol=1e-9)
        assert out[0, 0] == pytest.approx(1.0, abs=1e-9)
        assert out[k - 1, k - 1] == pytest.approx(1.0, abs=1e-9)
        torch.testing.assert_close(out.sum(-1), torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-12)
    # Random distributions are unchanged as well.
    probs = torch.randn(2, 16, k, dtype=torch.float64).softmax(-1)
    out = _target(probs, 0.0, 1.0, False, support, v_min, v_max)
    torch.testing.assert_close(out, probs.mean(0), rtol=0, atol=1e-9)


def test_item7_projection_identity_exact_in_float32_on_nice_grid() -> None:
    """On a grid whose atoms are exact binary fractions the identity holds bit-for-bit in float32."""
    v_min, v_max, k = -200.0, 200.0, 101
    support = _support(v_min, v_max, k)
    eye = torch.eye(k)
    out = project_distribution(eye, support.expand(k, k), v_min, v_max, k)
    assert torch.equal(out, eye)


def test_item7_projection_mean_matches_shifted_mean_when_unclipped() -> None:
    v_min, v_max, k = -10.0, 10.0, 41
    support = _support(v_min, v_max, k, torch.float64)
    probs = torch.randn(2, 32, k, dtype=torch.float64).softmax(-1)
    reward = torch.empty(32, dtype=torch.float64).uniform_(-0.9, 0.9)
    gamma = 0.9  # |r + γ z| ≤ 0.9 + 9 < 10: nothing is clipped
    out = soft_distributional_target(
        probs,
        reward,
        torch.zeros(32, dtype=torch.bool),
        torch.zeros(32, dtype=torch.float64),
        torch.tensor(0.0, dtype=torch.float64),
        gamma,
        support,
        v_min,
        v_max,
    )
    expected = (reward + gamma * (probs * support).sum(-1)).mean(0)  # clip(r + γE[z]) averaged over critics
    torch.testing.assert_close((out * support).sum(-1), expected, rtol=0, atol=1e-10)
    # Per critic, directly on project_distribution.
    shifted = reward.unsqueeze(-1) + gamma * support
    proj = project_distribution(probs, shifted, v_min, v_max, k)
    torch.testing.assert_close((proj * support).sum(-1), (probs * shifted).sum(-1), rtol=0, atol=1e-10)


def test_item7_projection_mean_is_clipped_when_atoms_leave_support() -> None:
    """Sanity check of the clip: a shift beyond v_max collapses the mass to the last atom (mean = v_max)."""
    v_min, v_max, k = -10.0, 10.0, 21
    support = _support(v_min, v_max, k, torch.float64)
    probs = torch.randn(1, 8, k, dtype=torch.float64).softmax(-1)
    out = _target(probs, 25.0, 0.5, False, support, v_min, v_max)  # r + γz ≥ 20 > v_max
    torch.testing.assert_close(out[:, -1], torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("reward", "atom"), [(1e3, 20), (10.0, 20), (-1e3, 0), (-10.0, 0), (0.0, 10), (3.0, 13), (-7.0, 3)]
)
def test_item7_terminal_transition_puts_all_mass_on_clipped_reward_atom(reward: float, atom: int) -> None:
    v_min, v_max, k = -10.0, 10.0, 21  # grid spacing 1: every integer reward in range is a grid point
    support = _support(v_min, v_max, k, torch.float64)
    probs = torch.randn(2, 8, k, dtype=torch.float64).softmax(-1)
    # α and log π' must not matter for a terminal transition.
    out = _target(probs, reward, 0.99, True, support, v_min, v_max, alpha=0.7, log_prob=-5.0)
    expected = torch.zeros(8, k, dtype=torch.float64)
    expected[:, atom] = 1.0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert (out * support).sum(-1).sub(min(max(reward, v_min), v_max)).abs().max() < 1e-12


def test_item7_terminal_transition_between_grid_points_splits_mass_with_mean_clip_r() -> None:
    v_min, v_max, k = -10.0, 10.0, 21
    support = _support(v_min, v_max, k, torch.float64)
    probs = torch.randn(2, 4, k, dtype=torch.float64).softmax(-1)
    out = _target(probs, 2.25, 0.99, True, support, v_min, v_max, alpha=1.0, log_prob=3.0)
    # 2.25 lies between atoms 12 (z=2) and 13 (z=3): 0.75 and 0.25 of the mass.
    assert torch.allclose(out[:, 12], torch.full((4,), 0.75, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out[:, 13], torch.full((4,), 0.25, dtype=torch.float64), atol=1e-12)
    assert out.sum(-1).sub(1.0).abs().max() < 1e-12
    torch.testing.assert_close((out * support).sum(-1), torch.full((4,), 2.25, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# Item 9: batch renormalisation
# ---------------------------------------------------------------------------------------------------------

EPS = 1e-3


def _brn(num_features: int = 4, warmup_steps: int = 5, momentum: float = 0.01) -> BatchRenorm:
    return BatchRenorm(
        num_features, momentum=momentum, eps=EPS, max_r=3.0, max_d=5.0, warmup_steps=warmup_steps
    )


def _batch(rows: int = 32, features: int = 4) -> torch.Tensor:
    return torch.randn(rows, features, dtype=torch.float32) * torch.tensor(
        [1.0, 3.0, 0.2, 7.0]
    ) + torch.tensor([0.5, -2.0, 4.0, 0.0])


def _renorm_formula(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, clip: bool = True
) -> torch.Tensor:
    """(x − μ_B)/σ_B · r + d with σ = sqrt(var + eps), r and d from the pre-update running statistics."""
    mu_b = x.mean(0)
    sigma_b = (x.var(0, unbiased=False) + EPS).sqrt()
    sigma_run = (running_var + EPS).sqrt()
    r = sigma_b / sigma_run
    d = (mu_b - running_mean) / sigma_run
    if clip:
        r, d = r.clamp(1 / 3, 3.0), d.clamp(-5.0, 5.0)
    return (x - mu_b) / sigma_b * r + d


def test_critic_brn_uses_flax_conventions() -> None:
    critic = DistributionalCritic(3, 2, hidden_dims=(8, 8), num_atoms=5, v_min=-1.0, v_max=1.0)
    brns = [m for m in critic.modules() if isinstance(m, BatchRenorm)]
    assert len(brns) == 2 * 3  # per critic: input BRN + one per hidden layer
    for m in brns:
        assert (m.momentum, m.eps, m.max_r, m.max_d, m.warmup_steps) == (0.01, 1e-3, 3.0, 5.0, 100_000)
    # Independent statistics per critic (not shared buffers).
    assert critic.critics[0][0].running_mean.data_ptr() != critic.critics[1][0].running_mean.data_ptr()


def test_item9_brn_before_warmup_is_batchnorm_on_batch_statistics() -> None:
    brn = _brn(warmup_steps=5)
    x = _batch()
    # Running stats far from the batch: during warm-up they must not influence the output.
    brn.running_mean.fill_(100.0)
    brn.running_var.fill_(1e-4)
    for _ in range(5):  # calls 1..warmup_steps are all plain BatchNorm
        out = brn(x)
        expected = (x - x.mean(0)) / (x.var(0, unbiased=False) + EPS).sqrt()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        reference = F.batch_norm(x, None, None, training=True, eps=EPS)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(brn.weight.detach(), torch.ones(4))
    torch.testing.assert_close(brn.bias.detach(), torch.zeros(4))
    # The next call is past warm-up and no longer plain BatchNorm (with these running stats).
    assert not torch.allclose(brn(x), expected, atol=1e-2)


def test_item9_brn_running_stats_one_update() -> None:
    brn = _brn()
    old_mean = torch.tensor([0.3, -1.0, 2.0, 5.0])
    old_var = torch.tensor([2.0, 0.5, 1.5, 9.0])
    brn.running_mean.copy_(old_mean)
    brn.running_var.copy_(old_var)
    x = _batch(rows=16)
    brn(x)
    torch.testing.assert_close(brn.running_mean, 0.99 * old_mean + 0.01 * x.mean(0))
    # Convention: the running variance tracks the *unbiased* batch variance (n/(n−1) · biased).
    torch.testing.assert_close(brn.running_var, 0.99 * old_var + 0.01 * x.var(0, unbiased=True))
    assert not torch.allclose(brn.running_var, 0.99 * old_var + 0.01 * x.var(0, unbiased=False), rtol=1e-6)
    assert int(brn.num_batches_tracked) == 1


def test_item9_brn_eval_uses_running_stats_and_changes_no_buffer() -> None:
    brn = _brn(warmup_steps=2)
    for _ in range(4):
        brn(_batch())
    with torch.no_grad():
        brn.weight.copy_(torch.tensor([1.5, 0.5, 2.0, -1.0]))
        brn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    brn.eval()
    before = {k: v.clone() for k, v in brn.state_dict().items()}
    x = _batch(rows=7) * 3.0 + 1.0
    out = brn(x)
    expected = (x - brn.running_mean) / (brn.running_var + EPS).sqrt() * brn.weight + brn.bias
    torch.testing.assert_close(out, expected)
    after = brn.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    # A single row works in eval mode and does not depend on the rest of the batch.
    torch.testing.assert_close(brn(x[:1]), out[:1])


def test_item9_brn_after_warmup_clips_r_and_d() -> None:
    warmup = 3
    brn = _brn(warmup_steps=warmup)
    for _ in range(warmup):
        brn(_batch())
    assert int(brn.num_batches_tracked) == warmup
    x = _batch(rows=64)
    mu_b, var_b = x.mean(0), x.var(0, unbiased=False)
    # Feature 0: r ≫ 3 (tiny running var) and d ≫ 5; feature 1: r ≪ 1/3 (huge running var), d unclipped;
    # feature 2: d ≪ −5 with r unclipped; feature 3: nothing clipped.
    sd_b = var_b.sqrt()
    running_mean = torch.stack([mu_b[0] - 10.0, mu_b[1] + 1.0, mu_b[2] + 50.0, mu_b[3] - 0.5 * sd_b[3]])
    running_var = torch.stack([var_b[0] * 1e-3, var_b[1] * 100.0, var_b[2] * 2.0, var_b[3] * 1.5])
    brn.running_mean.copy_(running_mean)
    brn.running_var.copy_(running_var)
    sigma_run = (running_var + EPS).sqrt()
    r_raw = (var_b + EPS).sqrt() / sigma_run
    d_raw = (mu_b - running_mean) / sigma_run
    assert r_raw[0] > 3 and r_raw[1] < 1 / 3 and d_raw[0] > 5 and d_raw[2] < -5  # the clip is active
    assert 1 / 3 < r_raw[3] < 3 and -5 < d_raw[3] < 5
    out = brn(x)
    torch.testing.assert_close(out, _renorm_formula(x, running_mean, running_var), rtol=1e-5, atol=1e-5)
    unclipped = _renorm_formula(x, running_mean, running_var, clip=False)
    assert not torch.allclose(out[:, :3], unclipped[:, :3], atol=1e-2)
    torch.testing.assert_close(out[:, 3], unclipped[:, 3], rtol=1e-5, atol=1e-5)


def test_item9_brn_warmup_factor_saturates_at_one() -> None:
    """Regression: torchrl's out-of-place clamp lets the warm-up factor reach 2, 3, … after 2×, 3× warm-up."""
    warmup = 4
    brn = _brn(warmup_steps=warmup)
    for _ in range(3 * warmup):
        brn(_batch())
    assert int(brn.num_batches_tracked) == warmup
    x = _batch(rows=64)
    mu_b, var_b = x.mean(0), x.var(0, unbiased=False)
    # r = 2 and d = 1 (both inside their clip range): a factor f would give r = 1 + f and d = f instead.
    running_var = (var_b + EPS) / 4.0 - EPS
    running_mean = mu_b - (running_var + EPS).sqrt()
    brn.running_mean.copy_(running_mean)
    brn.running_var.copy_(running_var)
    out = brn(x)
    expected = (x - mu_b) / (var_b + EPS).sqrt() * 2.0 + 1.0
    torch.testing.assert_close(_renorm_formula(x, running_mean, running_var), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert int(brn.num_batches_tracked) == warmup


def test_item9_brn_without_warmup_renormalises_from_first_call() -> None:
    brn = _brn(warmup_steps=0)
    brn.running_mean.fill_(1.0)
    brn.running_var.fill_(4.0)
    x = _batch()
    out = brn(x)
    torch.testing.assert_close(
        out, _renorm_formula(x, torch.full((4,), 1.0), torch.full((4,), 4.0)), rtol=1e-5, atol=1e-5
    )


def _small_critic(**kwargs) -> DistributionalCritic:
    defaults = dict(
        num_critics=2, hidden_dims=(16, 16), num_atoms=11, v_min=-5.0, v_max=5.0, brn_warmup_steps=2
    )
    defaults.update(kwargs)
    return DistributionalCritic(3, 2, **defaults)


def _brn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_item9_joint_forward_splits_back_correctly() -> None:
    critic = _small_critic()
    # Move past warm-up so that both modes of BRN are exercised by the joint pass.
    for _ in range(3):
        critic(torch.randn(20, 3), torch.rand(20, 2) * 2 - 1)
    twin = copy.deepcopy(critic)
    separate = copy.deepcopy(critic)
    b = 6
    obs, act = torch.randn(b, 3), torch.rand(b, 2) * 2 - 1
    next_obs, next_act = torch.randn(b, 3) + 2.0, torch.rand(b, 2) * 2 - 1
    logits, next_logits = critic.joint(obs, act, next_obs, next_act)
    assert logits.shape == next_logits.shape == (2, b, 11)
    full = twin(torch.cat([obs, next_obs]), torch.cat([act, next_act]))  # (C, 2B, K)
    torch.testing.assert_close(logits, full[:, :b])
    torch.testing.assert_close(next_logits, full[:, b:])
    # One joint pass updates the statistics exactly once, like the single forward of the concatenation.
    after_joint, after_full = _brn_buffers(critic), _brn_buffers(twin)
    for key, value in after_joint.items():
        torch.testing.assert_close(value, after_full[key], msg=key)
    # Separate train-mode forwards use per-half batch statistics: they differ from the joint pass.
    alone = separate(obs, act)
    assert not torch.allclose(alone, logits, atol=1e-3)


def test_item9_joint_forward_in_eval_equals_separate_forwards() -> None:
    critic = _small_critic()
    critic(torch.randn(20, 3), torch.rand(20, 2))
    critic.eval()
    obs, act = torch.randn(5, 3), torch.rand(5, 2)
    next_obs, next_act = torch.randn(5, 3), torch.rand(5, 2)
    logits, next_logits = critic.joint(obs, act, next_obs, next_act)
    torch.testing.assert_close(logits, critic(obs, act))
    torch.testing.assert_close(next_logits, critic(next_obs, next_act))


# ---------------------------------------------------------------------------------------------------------
# DistributionalCritic API
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_critics", [1, 2, 3])
def test_critic_output_shape_and_support(num_critics: int) -> None:
    critic = _small_critic(num_critics=num_critics, num_atoms=7, v_min=-3.0, v_max=9.0)
    logits = critic(torch.randn(10, 3), torch.rand(10, 2))
    assert logits.shape == (num_critics, 10, 7)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(critic.support, torch.linspace(-3.0, 9.0, 7))
    assert critic.support[0] == -3.0 and critic.support[-1] == 9.0
    assert (critic.v_min, critic.v_max, critic.num_atoms) == (-3.0, 9.0, 7)
    assert "support" in dict(critic.named_buffers())
    assert "support" not in dict(critic.named_parameters())


def test_critic_ensemble_members_have_independent_parameters() -> None:
    critic = _small_critic()
    w0 = critic.critics[0][1].weight
    w1 = critic.critics[1][1].weight
    assert w0.data_ptr() != w1.data_ptr()
    assert not torch.equal(w0, w1)
    logits = critic(torch.randn(8, 3), torch.rand(8, 2))
    assert not torch.allclose(logits[0], logits[1])


def test_critic_q_values_is_expected_value_of_softmax() -> None:
    critic = _small_critic(num_atoms=5, v_min=-2.0, v_max=2.0)
    logits = torch.randn(2, 6, 5)
    q = critic.q_values(logits)
    assert q.shape == (2, 6)
    torch.testing.assert_close(q, (logits.softmax(-1) * torch.linspace(-2.0, 2.0, 5)).sum(-1))
    # A (near) point mass at atom j gives Q = z_j.
    point = torch.full((1, 5, 5), -1e4)
    point[0, torch.arange(5), torch.arange(5)] = 0.0
    torch.testing.assert_close(critic.q_values(point)[0], torch.linspace(-2.0, 2.0, 5))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(v_min=1.0, v_max=1.0), "v_min"),
        (dict(v_min=2.0, v_max=-2.0), "v_min"),
        (dict(num_atoms=1), "num_atoms"),
        (dict(num_critics=0), "num_critics"),
        (dict(brn_momentum=0.0), "brn_momentum"),
        (dict(brn_warmup_steps=-1), "brn_warmup_steps"),
    ],
)
def test_critic_invalid_arguments_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DistributionalCritic(3, 2, hidden_dims=(4,), **kwargs)


@pytest.mark.parametrize("start_training", [True, False])
def test_critic_frozen_context(start_training: bool) -> None:
    critic = _small_critic()
    critic(torch.randn(16, 3), torch.rand(16, 2))  # populate running stats
    critic.train(start_training)
    params_before = list(critic.parameters())
    names_before = [n for n, _ in critic.named_parameters()]
    buffers_before = _brn_buffers(critic)
    obs = torch.randn(8, 3)
    action = (torch.rand(8, 2) * 2 - 1).requires_grad_()
    with critic.frozen() as frozen:
        assert frozen is critic
        assert not critic.training
        assert all(not m.training for m in critic.modules())
        q = critic.q_values(critic(obs, action)).mean()
        expected_eval = copy.deepcopy(critic).eval()(obs, action)
    assert critic.training == start_training
    assert all(m.training == start_training for m in critic.modules())
    # Parameters are the very same nn.Parameter objects again, still registered.
    params_after = list(critic.parameters())
    assert [n for n, _ in critic.named_parameters()] == names_before
    assert all(isinstance(p, nn.Parameter) for p in params_after)
    assert all(a is b for a, b in zip(params_before, params_after, strict=True))
    # Eval forward: no buffer changed.
    for key, value in _brn_buffers(critic).items():
        assert torch.equal(value, buffers_before[key]), key
    # Backward after leaving the context: grad reaches the action, never the critic parameters.
    q.backward()
    assert action.grad is not None and action.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())
    with torch.no_grad():
        critic.eval()
        torch.testing.assert_close(critic(obs, action), expected_eval)


def test_critic_frozen_restores_training_flag_on_exception() -> None:
    critic = _small_critic()
    critic.train()
    with pytest.raises(RuntimeError, match="boom"), critic.frozen():
        raise RuntimeError("boom")
    assert critic.training
    assert all(isinstance(p, nn.Parameter) for p in critic.parameters())


def test_critic_forward_outside_frozen_gives_parameter_grads() -> None:
    """Control for the frozen test: the same computation in plain eval mode does reach the parameters."""
    critic = _small_critic().eval()
    action = torch.rand(8, 2).requires_grad_()
    critic.q_values(critic(torch.randn(8, 3), action)).mean().backward()
    grads = [p.grad for p in critic.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert math.isfinite(float(action.grad.abs().sum()))


def test_projection_of_a_nan_target_is_nan_not_an_index_error() -> None:
    probs = torch.full((3, 11), 1.0 / 11)
    shifted = torch.linspace(-10.0, 10.0, 11).expand(3, 11).clone()
    shifted[1, 4] = float("nan")
    out = project_distribution(probs, shifted, -10.0, 10.0, 11)
    assert torch.isnan(out[1]).any()  # the NaN row stays NaN (a later non-finite check sees it)
    torch.testing.assert_close(out[[0, 2]].sum(-1), torch.ones(2))  # the other rows are untouched
