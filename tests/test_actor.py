"""DiffusionActor: docs/algorithm.md §8 items 1–6 (shapes, schedule, zero-control identity, the entropy bound,
initial policy, gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dime_lightning.actor import ControlNetwork, DiffusionActor, cosine_step_profile
from dime_lightning.critic import DistributionalCritic
from dime_lightning.losses import actor_loss
from dime_lightning.policy import tanh_log_det_jacobian
from dime_lightning.update import maybe_compile

REFERENCE_PROFILE = [0.9998, 0.988, 0.9577, 0.9101, 0.847, 0.7708, 0.6844, 0.5911, 0.4943, 0.3977,
                     0.305, 0.2198, 0.1451, 0.0839, 0.0384, 0.0104]
PRIOR_ENTROPY_PER_DIM = 0.5 * math.log(2 * math.pi * math.e) + math.log(2.5)  # 2.3352


def log_w(out) -> torch.Tensor:
    """Σ_n log B − log F recovered from the outputs: running = −(log_w + logdet)."""
    return -out.running_cost - tanh_log_det_jacobian(out.pre_tanh)


def linear_control(k: float, b: float):
    """State-independent u = −k·x + b (the Gaussian-case control)."""
    return lambda x, obs, n: -k * x + b


def exact_gaussian_marginal(actor: DiffusionActor, k: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """mean/var of x_N from the exact recursion mean' = A mean + η b, var' = A² var + 2η, A = 1 − η(1/σ0² + k)."""
    eta = actor.step_sizes().detach().double().numpy()  # (N, D)
    mean = np.zeros(eta.shape[1])
    var = np.full(eta.shape[1], actor.prior_std**2)
    for eta_n in eta:
        a = 1.0 - eta_n * (1.0 / actor.prior_std**2 + k)
        mean, var = a * mean + eta_n * b, a**2 * var + 2.0 * eta_n
    return mean, var


# 1. shapes and bounds
@pytest.mark.parametrize(("batch", "obs_dim", "action_dim"), [(1, 3, 1), (7, 5, 4)])
def test_shapes_and_bounds(batch, obs_dim, action_dim):
    torch.manual_seed(0)
    actor = DiffusionActor(obs_dim, action_dim, hidden_dim=32, time_features=16, time_hidden_dim=16)
    out = actor(torch.randn(batch, obs_dim), return_trajectory=True)
    assert out.action.shape == (batch, action_dim) and out.pre_tanh.shape == (batch, action_dim)
    for name in ("log_prob", "running_cost", "terminal_cost"):
        assert getattr(out, name).shape == (batch,), name
    assert out.trajectory.shape == (actor.num_steps + 1, batch, action_dim)
    assert torch.equal(out.trajectory[-1], out.pre_tanh)
    assert out.action.abs().max() < 1.0
    assert torch.allclose(out.log_prob, out.running_cost + out.terminal_cost)
    assert actor(torch.randn(batch, obs_dim)).trajectory is None
    assert actor.act(torch.randn(obs_dim)).shape == (action_dim,)
    assert actor.act(torch.randn(batch, obs_dim)).shape == (batch, action_dim)
    assert actor.step_sizes().shape == (actor.num_steps, action_dim)


def test_act_has_no_graph_and_forward_has_gradients():
    actor = DiffusionActor(2, 2, hidden_dim=16, time_features=8, time_hidden_dim=8)
    assert not actor.act(torch.randn(4, 2)).requires_grad
    assert actor(torch.randn(4, 2)).log_prob.requires_grad


@pytest.mark.parametrize(("name", "value"), [("num_steps", 0), ("action_dim", 0), ("prior_std", 0.0),
                                             ("init_dt", -0.1)])
def test_invalid_arguments_name_the_problem(name, value):
    kwargs = {"obs_dim": 2, "action_dim": 2, name: value}
    with pytest.raises(ValueError, match=name):
        DiffusionActor(**kwargs)


# 2. schedule
def test_schedule_values():
    profile = cosine_step_profile(16)
    assert torch.allclose(profile, torch.tensor(REFERENCE_PROFILE), atol=1e-4)
    assert profile.sum().item() == pytest.approx(8.4437, abs=1e-4)
    actor = DiffusionActor(3, 2)
    assert actor.dt_param.item() == pytest.approx(-2.25217, abs=1e-5)
    assert torch.allclose(actor.friction_param, torch.full((2,), 0.54132), atol=1e-5)
    assert torch.nn.functional.softplus(actor.dt_param).item() == pytest.approx(0.1, abs=1e-7)
    eta = actor.step_sizes()
    assert torch.allclose(eta, 0.1 * profile.unsqueeze(-1).expand(16, 2), atol=1e-7)
    assert eta.sum(0)[0].item() == pytest.approx(0.84437, abs=1e-4)


def test_step_sizes_scale_inversely_with_friction():
    actor = DiffusionActor(3, 2)
    with torch.no_grad():
        actor.friction_param[1] = math.log(math.expm1(2.0))  # softplus = 2
    eta = actor.step_sizes()
    assert torch.allclose(eta[:, 1], eta[:, 0] / 2.0)


# 3. zero-control identity (exact, float64)
@pytest.mark.parametrize("action_dim", [1, 5, 38])
def test_zero_control_identity(action_dim):
    torch.manual_seed(1)
    actor = DiffusionActor(3, action_dim, hidden_dim=16, time_features=8, time_hidden_dim=8).double()
    with torch.no_grad():
        actor.friction_param.copy_(torch.linspace(-1.0, 2.0, action_dim, dtype=torch.float64))
    actor.control = lambda x, obs, n: torch.zeros_like(x)
    out = actor(torch.randn(64, 3, dtype=torch.float64), return_trajectory=True)
    eta = actor.step_sizes().detach()  # (N, D)
    var = 2.0 * eta / (1.0 - (1.0 - eta / actor.prior_std**2) ** 2)  # stationary variance of step n's kernel

    def log_normal(x, v):
        return (-0.5 * x**2 / v - 0.5 * torch.log(2 * math.pi * v)).sum(-1)

    chain = out.trajectory
    expected = sum(log_normal(chain[n], var[n]) - log_normal(chain[n + 1], var[n]) for n in range(16))
    assert (log_w(out).detach() - expected).abs().max().item() < 1e-8


# 4. bound on Gaussian cases
@pytest.mark.parametrize(("k", "b", "action_dim"), [(0.0, 0.0, 1), (0.0, 0.0, 3), (0.0, 0.3, 3),
                                                    (1.0, 0.0, 1), (4.0, 0.5, 2), (20.0, -1.0, 3)])
def test_bound_on_gaussian_case(k, b, action_dim):
    torch.manual_seed(2)
    samples = 200_000
    actor = DiffusionActor(1, action_dim, hidden_dim=8, time_features=4, time_hidden_dim=4).double()
    actor.control = linear_control(k, b)
    with torch.no_grad():
        out = actor(torch.zeros(samples, 1, dtype=torch.float64))
    _, var = exact_gaussian_marginal(actor, k, b)
    true_entropy = 0.5 * np.log(2 * np.pi * np.e * var).sum()
    bound = -(out.terminal_cost - log_w(out))  # per-sample pre-squash entropy bound
    estimate, se = bound.mean().item(), bound.std().item() / math.sqrt(samples)
    assert estimate <= true_entropy + 3 * se
    if k == 0.0 and b == 0.0:  # u ≡ 0: the noising chain is the exact reversal, the bound is tight
        assert abs(estimate - true_entropy) <= 3 * se + 1e-3
    else:
        assert estimate < true_entropy - 3 * se  # strictly loose otherwise


@pytest.mark.parametrize(("k", "b"), [(0.0, 0.0), (2.0, 0.5), (10.0, 0.0)])
def test_bound_on_squashed_gaussian_case(k, b):
    torch.manual_seed(3)
    samples = 200_000
    actor = DiffusionActor(1, 1, hidden_dim=8, time_features=4, time_hidden_dim=4).double()
    actor.control = linear_control(k, b)
    with torch.no_grad():
        out = actor(torch.zeros(samples, 1, dtype=torch.float64))
    mean, var = exact_gaussian_marginal(actor, k, b)
    # H(tanh x) = H(x) + E[log(1 − tanh² x)], the expectation by quadrature on a fine grid.
    std = math.sqrt(var[0])
    grid = torch.linspace(mean[0] - 12 * std, mean[0] + 12 * std, 400_001, dtype=torch.float64)
    density = torch.exp(-0.5 * (grid - mean[0]) ** 2 / var[0]) / math.sqrt(2 * math.pi * var[0])
    expected_log_det = torch.trapezoid(density * tanh_log_det_jacobian(grid.unsqueeze(-1)), grid).item()
    true_entropy = 0.5 * math.log(2 * math.pi * math.e * var[0]) + expected_log_det
    estimate = -out.log_prob.mean().item()
    se = out.log_prob.std().item() / math.sqrt(samples)
    assert estimate <= true_entropy + 3 * se
    if k == 0.0 and b == 0.0:
        assert abs(estimate - true_entropy) <= 3 * se + 1e-3


# 5. at initialisation
def test_initial_policy_is_langevin_on_prior():
    torch.manual_seed(4)
    action_dim = 6
    actor = DiffusionActor(5, action_dim)
    with torch.no_grad():
        out = actor(torch.randn(20_000, 5))
    assert abs(log_w(out).mean().item()) < 0.01 * action_dim
    expected_log_det = tanh_log_det_jacobian(out.pre_tanh).mean().item()
    assert expected_log_det < 0
    assert (out.running_cost + out.terminal_cost).mean().item() == pytest.approx(
        -PRIOR_ENTROPY_PER_DIM * action_dim - expected_log_det, abs=0.05 * action_dim
    )
    assert out.pre_tanh.var().item() == pytest.approx(6.259, rel=0.03)  # ≈ tanh(N(0, 2.5²)): saturated
    assert (out.action.abs() > 0.9).float().mean().item() > 0.5


def test_tanh_log_det_is_stable_and_exact():
    x = torch.tensor([[-30.0, -3.0, 0.0, 0.5, 3.0, 30.0]], dtype=torch.float64).T
    naive = torch.log(1 - torch.tanh(x[1:-1]) ** 2).squeeze(-1)
    assert torch.allclose(tanh_log_det_jacobian(x[1:-1]), naive)
    assert torch.isfinite(tanh_log_det_jacobian(x)).all()
    assert tanh_log_det_jacobian(x[:1]).item() == pytest.approx(2 * (math.log(2) - 30.0), abs=1e-9)


# 6. gradients
def _fixed_noise_objective(actor: DiffusionActor, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    out = actor(obs, noise=noise)
    return (out.running_cost + out.terminal_cost).mean()


def _finite_difference(actor, param, index, obs, noise, h=1e-6) -> float:
    with torch.no_grad():
        original = param[index].item()
        param[index] = original + h
        up = _fixed_noise_objective(actor, obs, noise).item()
        param[index] = original - h
        down = _fixed_noise_objective(actor, obs, noise).item()
        param[index] = original
    return (up - down) / (2 * h)


def test_gradients_match_finite_differences():
    torch.manual_seed(5)
    actor = DiffusionActor(3, 2, hidden_dim=16, time_features=8, time_hidden_dim=8).double()
    with torch.no_grad():
        actor.control_net.head.weight.normal_(0.0, 0.3)  # a non-trivial control so inner weights matter
        actor.friction_param.copy_(torch.tensor([0.2, 1.0], dtype=torch.float64))
    obs = torch.randn(16, 3, dtype=torch.float64)
    noise = torch.randn(17, 16, 2, dtype=torch.float64)
    actor.zero_grad()
    _fixed_noise_objective(actor, obs, noise).backward()
    checks = [(actor.dt_param, ()), (actor.friction_param, (0,)), (actor.friction_param, (1,)),
              (actor.control_net.head.weight, (1, 3)), (actor.control_net.input_obs.weight, (2, 1)),
              (actor.control_net.input_x.weight, (0, 1)),
              (actor.control_net.time_embedding.phase, (0,))]
    for param, index in checks:
        numeric = _finite_difference(actor, param, index, obs, noise)
        assert param.grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_step_size_gradient_is_nonzero_with_zero_control():
    torch.manual_seed(6)
    actor = DiffusionActor(3, 2).double()
    actor.control = lambda x, obs, n: torch.zeros_like(x)
    obs = torch.randn(32, 3, dtype=torch.float64)
    noise = torch.randn(17, 32, 2, dtype=torch.float64)
    _fixed_noise_objective(actor, obs, noise).backward()
    assert actor.dt_param.grad.abs().item() > 1e-6
    assert actor.friction_param.grad.abs().min().item() > 1e-6
    numeric = _finite_difference(actor, actor.dt_param, (), obs, noise)
    assert actor.dt_param.grad.item() == pytest.approx(numeric, rel=1e-5)


def test_fixed_noise_is_deterministic_and_act_matches_forward_distribution():
    torch.manual_seed(7)
    actor = DiffusionActor(2, 1, hidden_dim=16, time_features=8, time_hidden_dim=8)
    obs = torch.randn(4, 2)
    noise = torch.randn(17, 4, 1)
    assert torch.equal(actor(obs, noise=noise).action, actor(obs, noise=noise).action)
    torch.manual_seed(8)
    sampled = actor(obs[:1].expand(5000, 2)).action
    torch.manual_seed(8)
    acted = actor.act(obs[:1].expand(5000, 2))
    assert torch.equal(sampled.detach(), acted)


def test_network_fast_path_equals_the_control_contract():
    """The sampler's per-chain context precompute gives exactly control(x, obs, n) at every step."""
    torch.manual_seed(9)
    actor = DiffusionActor(4, 3, hidden_dim=32, time_features=8, time_hidden_dim=16).double()
    with torch.no_grad():
        actor.control_net.head.weight.normal_(0.0, 0.5)
    obs = torch.randn(8, 4, dtype=torch.float64)
    noise = torch.randn(actor.num_steps + 1, 8, 3, dtype=torch.float64)
    fast = actor(obs, noise=noise)
    net = actor.control_net
    actor.control = lambda x, o, n: net(x, o, n)  # the public contract, one call per step
    slow = actor(obs, noise=noise)
    assert torch.allclose(fast.log_prob, slow.log_prob, atol=1e-12)
    assert torch.allclose(fast.action, slow.action, atol=1e-12)
    actor.control = net  # a module restores the network path
    assert actor.control is actor.control_net


# the control contract: any callable control(x, obs, step_index) -> u, an nn.Module or not
class AffineControl(nn.Module):
    """u = x Aᵀ + obs Bᵀ + c·n: an nn.Module with the contract's signature and no ``context``."""

    def __init__(self, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.a = nn.Parameter(0.3 * torch.randn(action_dim, action_dim))
        self.b = nn.Parameter(0.3 * torch.randn(action_dim, obs_dim))
        self.c = nn.Parameter(torch.full((action_dim,), 0.05))

    def forward(self, x: torch.Tensor, obs: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T + obs @ self.b.T + self.c * step_index


def small_actor(obs_dim: int = 3, action_dim: int = 2) -> DiffusionActor:
    return DiffusionActor(obs_dim, action_dim, num_steps=4, hidden_dim=16, num_layers=2, time_features=8,
                          time_hidden_dim=8)


def small_critic(obs_dim: int = 3, action_dim: int = 2) -> DistributionalCritic:
    critic = DistributionalCritic(obs_dim, action_dim, hidden_dims=(16, 16), num_atoms=11, v_min=-5.0, v_max=5.0)
    critic.eval()  # running statistics at their initial values: a fixed critic
    return critic


def test_an_nn_module_control_samples_and_trains_through_the_bound():
    torch.manual_seed(10)
    actor, control = small_actor(), AffineControl(3, 2)
    actor.control = control
    assert actor.control is control and not actor.precomputes_context
    assert {id(p) for p in control.parameters()} <= {id(p) for p in actor.parameters()}  # trained with the actor
    obs, noise = torch.randn(8, 3), torch.randn(5, 8, 2)
    out = actor(obs, noise=noise)
    assert out.action.shape == (8, 2) and torch.isfinite(out.log_prob).all()
    assert actor.act(obs).shape == (8, 2) and actor.act(obs[0]).shape == (2,)
    plain = small_actor()
    plain.load_state_dict(actor.state_dict(), strict=False)
    plain.control = lambda x, o, n: control(x, o, n)  # the same function as a plain callable
    assert torch.equal(plain(obs, noise=noise).log_prob, out.log_prob)
    out.log_prob.mean().backward()  # the entropy bound alone reaches the control's parameters
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in control.parameters())
    actor.zero_grad()
    actor_loss(actor, small_critic(), obs, torch.tensor(0.2))["loss_actor"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in control.parameters())


def test_an_nn_module_control_under_torch_compile():
    """The compiled paths of DIMEModule (model.update.compile: the actor loss; compile_act: acting) with a module
    control: the same loss and gradients as eager."""
    torch.manual_seed(11)
    actor, critic = small_actor(), small_critic()
    actor.control = AffineControl(3, 2)
    obs, alpha = torch.randn(8, 3), torch.tensor(0.2)
    losses, grads = {}, {}
    for mode in ("none", "default"):
        actor.zero_grad()
        torch.manual_seed(12)
        with torch._inductor.config.patch(fallback_random=True):  # compiled code draws from the eager stream
            loss = maybe_compile(actor_loss, mode)(actor, critic, obs, alpha)["loss_actor"]
        loss.backward()
        losses[mode], grads[mode] = loss.detach(), [p.grad.clone() for p in actor.control.parameters()]
    torch.testing.assert_close(losses["default"], losses["none"], rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(grads["default"], grads["none"], strict=True):
        assert compiled.abs().sum() > 0
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
    torch.manual_seed(14)
    expected = actor.act(obs)
    torch.manual_seed(14)
    with torch._inductor.config.patch(fallback_random=True):
        acted = maybe_compile(actor.act, "default")(obs)
    torch.testing.assert_close(acted, expected, rtol=1e-5, atol=1e-6)


def test_the_built_in_network_takes_the_fast_path_and_nothing_else_does():
    torch.manual_seed(13)
    actor, obs = small_actor(), torch.randn(4, 3)
    net = actor.control_net
    contexts, calls = [], []
    net.context = lambda o, s: contexts.append(1) or ControlNetwork.context(net, o, s)
    net.register_forward_pre_hook(lambda module, args: calls.append(1))
    assert actor.precomputes_context
    actor(obs)
    assert (len(contexts), len(calls)) == (1, 0)  # the context once per chain, never the per-step forward
    actor.control = lambda x, o, n: net(x, o, n)  # a plain function: called at every step
    assert not actor.precomputes_context
    actor(obs)
    assert len(calls) == actor.num_steps

    class OwnForward(ControlNetwork):  # a subclass with its own forward is called as the contract says
        def forward(self, x, obs, step_index):
            return torch.zeros_like(x)

    actor.control = OwnForward(2, 3, hidden_dim=16, num_layers=2, time_features=8, time_hidden_dim=8)
    assert not actor.precomputes_context
    with torch.no_grad():
        out = actor(obs, return_trajectory=True)
    zero = small_actor()
    zero.control = lambda x, o, n: torch.zeros_like(x)
    noise = torch.randn(5, 4, 2)
    torch.testing.assert_close(actor(obs, noise=noise).log_prob, zero(obs, noise=noise).log_prob)
    assert out.trajectory.shape == (5, 4, 2)
