"""Tests for DIME's losses, temperature and optimizer helpers (docs/algorithm.md §2.2, §3, §8 items 8, 10, 12)."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from tensordict import TensorDict
from tiny_networks import ACTION_DIM, OBS_DIM, B, make_actor, make_batch, make_critic
from torch import nn

from dime_lightning.actor import DiffusionActor
from dime_lightning.critic import DistributionalCritic, project_distribution
from dime_lightning.errors import BadInputError
from dime_lightning.losses import (
    actor_loss,
    categorical_cross_entropy,
    critic_loss,
    soft_distributional_target,
    temperature_loss,
)
from dime_lightning.optim import ACTOR_CRITIC_BETAS, adam, gradient_norm, zero_nan_and_clip_gradients_
from dime_lightning.policy import ActorOutput
from dime_lightning.temperature import Temperature
from dime_lightning.update_settings import UpdateSettings

GAMMA = 0.99


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------
# Fixtures / helpers
# ---------------------------------------------------------------------------------------------------------


class FixedNextActor(nn.Module):
    """Deterministic stand-in for π(·|s'): fixed next actions and bound log-probs; records its inputs."""

    def __init__(self, action: torch.Tensor, log_prob: torch.Tensor) -> None:
        super().__init__()
        self.action, self.log_prob = action, log_prob
        self.inputs: list[torch.Tensor] = []

    def forward(self, obs: torch.Tensor) -> ActorOutput:
        self.inputs.append(obs)
        zeros = torch.zeros_like(self.log_prob)
        return ActorOutput(self.action, self.log_prob, self.log_prob, zeros, torch.atanh(self.action))


def manual_critic_loss(
    critic: DistributionalCritic,
    batch: TensorDict,
    next_action: torch.Tensor,
    next_log_prob: torch.Tensor,
    alpha: float,
    gamma: float,
    entropy_coef: float = 0.005,
    detach_target: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/algorithm.md §2.2 written out: joint pass, per-critic projection, average, CE − coef·H summed."""
    reward = batch["next", "reward"].squeeze(-1)
    done = batch["next", "terminated"].squeeze(-1).float()
    logits, next_logits = critic.joint(
        batch["observation"], batch["action"], batch["next", "observation"], next_action
    )
    next_probs = next_logits.softmax(-1)
    if detach_target:
        next_probs = next_probs.detach()
    shifted = reward[:, None] + gamma * (1 - done[:, None]) * (
        critic.support - alpha * next_log_prob[:, None]
    )
    projections = [
        project_distribution(next_probs[i], shifted, critic.v_min, critic.v_max, critic.num_atoms)
        for i in range(next_probs.shape[0])
    ]
    target = torch.stack(projections).mean(0)
    log_p = logits.log_softmax(-1)
    loss = torch.zeros(())
    for i in range(logits.shape[0]):
        cross_entropy = -(target * log_p[i]).sum(-1).mean()
        entropy = -(log_p[i].exp() * log_p[i]).sum(-1).mean()
        loss = loss + cross_entropy - entropy_coef * entropy
    return loss, target


def grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_no_grads(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is None or not p.grad.any(), f"{name} received a gradient"


def assert_state_equal(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed"


# ---------------------------------------------------------------------------------------------------------
# Item 8: critic target and loss
# ---------------------------------------------------------------------------------------------------------


def test_item8_critic_loss_matches_manual_computation_with_stop_grad_target() -> None:
    critic = make_critic()
    twin, no_stop = copy.deepcopy(critic), copy.deepcopy(critic)
    batch = make_batch()
    next_action = torch.rand(B, ACTION_DIM) * 1.8 - 0.9
    next_log_prob = torch.randn(B) * 3.0
    actor = FixedNextActor(next_action, next_log_prob)
    alpha = 0.3
    out = critic_loss(critic, actor, batch, torch.tensor(alpha), GAMMA)
    assert len(actor.inputs) == 1 and torch.equal(actor.inputs[0], batch["next", "observation"])
    out["loss_critic"].backward()

    expected, target = manual_critic_loss(twin, batch, next_action, next_log_prob, alpha, GAMMA)
    expected.backward()
    torch.testing.assert_close(out["loss_critic"].detach(), expected.detach())
    got, want = grads(critic), grads(twin)
    for name, g in got.items():
        assert g is not None, name
        torch.testing.assert_close(g, want[name], msg=name)
    # Diagnostics carry no graph; target_q_mean is the mean of Σ_j T̄_j z_j.
    for key in ("critic_cross_entropy", "critic_entropy", "q_mean", "target_q_mean", "next_log_prob_mean"):
        assert out[key].grad_fn is None and not out[key].requires_grad, key
    torch.testing.assert_close(out["target_q_mean"], (target * twin.support).sum(-1).mean())
    torch.testing.assert_close(out["next_log_prob_mean"], next_log_prob.mean())

    # Control: letting the gradient flow through the target changes the critic gradient.
    leaky, _ = manual_critic_loss(
        no_stop, batch, next_action, next_log_prob, alpha, GAMMA, detach_target=False
    )
    leaky.backward()
    leaky_grads = grads(no_stop)
    assert any(not torch.allclose(g, leaky_grads[n]) for n, g in got.items())


def test_item8_critic_loss_does_not_differentiate_through_alpha() -> None:
    critic = make_critic()
    temperature = Temperature(ACTION_DIM, init_alpha=0.5)
    actor = FixedNextActor(torch.rand(B, ACTION_DIM) * 1.8 - 0.9, torch.randn(B))
    alpha_with_graph = temperature.log_alpha.exp()  # even a non-detached α must not receive a gradient
    out = critic_loss(critic, actor, make_batch(), alpha_with_graph, GAMMA)
    out["loss_critic"].backward()
    assert temperature.log_alpha.grad is None


def test_item8_critic_loss_single_joint_pass_updates_brn_once() -> None:
    critic = make_critic()
    twin = copy.deepcopy(critic)
    batch = make_batch()
    next_action = torch.rand(B, ACTION_DIM) * 1.8 - 0.9
    critic_loss(critic, FixedNextActor(next_action, torch.randn(B)), batch, torch.tensor(0.2), GAMMA)
    twin(
        torch.cat([batch["observation"], batch["next", "observation"]]),
        torch.cat([batch["action"], next_action]),
    )
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(critic.state_dict()[key], value, msg=key)
    assert all(int(v) == 1 for k, v in critic.state_dict().items() if k.endswith("num_batches_tracked"))


def test_item8_target_is_average_of_individual_projections() -> None:
    v_min, v_max, k = -5.0, 5.0, 11
    support = torch.linspace(v_min, v_max, k, dtype=torch.float64)
    next_probs = torch.randn(2, B, k, dtype=torch.float64).mul(2).softmax(-1)
    reward = torch.randn(B, dtype=torch.float64) * 2
    terminated = torch.rand(B) < 0.3
    log_prob = torch.randn(B, dtype=torch.float64) * 3
    alpha = torch.tensor(0.4, dtype=torch.float64)
    target = soft_distributional_target(
        next_probs, reward, terminated, log_prob, alpha, GAMMA, support, v_min, v_max
    )
    assert target.shape == (B, k)
    discount = GAMMA * (1 - terminated.double())
    shifted = reward[:, None] + discount[:, None] * (support - alpha * log_prob[:, None])
    p0 = project_distribution(next_probs[0], shifted, v_min, v_max, k)
    p1 = project_distribution(next_probs[1], shifted, v_min, v_max, k)
    torch.testing.assert_close(target, 0.5 * (p0 + p1))
    torch.testing.assert_close(target.sum(-1), torch.ones(B, dtype=torch.float64))
    # Not the projection of one critic alone (e.g. a min-style selection).
    assert not torch.allclose(target, p0) and not torch.allclose(target, p1)


def test_item8_target_does_not_propagate_gradient_inside_critic_loss() -> None:
    """The target is computed under no_grad in critic_loss; standalone it is differentiable (documented)."""
    critic = make_critic()
    actor = FixedNextActor(torch.rand(B, ACTION_DIM) * 1.8 - 0.9, torch.randn(B))
    batch = make_batch()
    out = critic_loss(critic, actor, batch, torch.tensor(0.1), GAMMA)
    assert out["loss_critic"].requires_grad
    assert out["target_q_mean"].grad_fn is None


def test_item8_entropy_shift_is_minus_gamma_one_minus_d_alpha_logprob() -> None:
    v_min, v_max, k = -20.0, 20.0, 41
    support = torch.linspace(v_min, v_max, k, dtype=torch.float64)
    probs = torch.randn(2, B, k, dtype=torch.float64).softmax(-1)
    reward = torch.randn(B, dtype=torch.float64)
    terminated = torch.tensor([False, True, False, False, True, False, False, False])
    log_prob = torch.randn(B, dtype=torch.float64) * 2
    alpha = 0.7
    shift = -GAMMA * (1 - terminated.double()) * alpha * log_prob  # (B,)
    with_alpha = soft_distributional_target(
        probs,
        reward,
        terminated,
        log_prob,
        torch.tensor(alpha, dtype=torch.float64),
        GAMMA,
        support,
        v_min,
        v_max,
    )
    zero_alpha_shifted = soft_distributional_target(
        probs,
        reward + shift,
        terminated,
        torch.zeros(B),
        torch.tensor(0.0, dtype=torch.float64),
        GAMMA,
        support,
        v_min,
        v_max,
    )
    torch.testing.assert_close(with_alpha, zero_alpha_shifted)
    # Point masses at interior atoms (nothing clipped): the projected mean moves by exactly `shift`.
    for j in (15, 20, 25):
        point = torch.zeros(1, B, k, dtype=torch.float64)
        point[..., j] = 1.0
        mean_alpha = (
            soft_distributional_target(
                point,
                reward,
                terminated,
                log_prob,
                torch.tensor(alpha, dtype=torch.float64),
                GAMMA,
                support,
                v_min,
                v_max,
            )
            * support
        ).sum(-1)
        mean_zero = (
            soft_distributional_target(
                point,
                reward,
                terminated,
                log_prob,
                torch.tensor(0.0, dtype=torch.float64),
                GAMMA,
                support,
                v_min,
                v_max,
            )
            * support
        ).sum(-1)
        torch.testing.assert_close(mean_alpha - mean_zero, shift)
        torch.testing.assert_close(mean_zero, reward + GAMMA * (1 - terminated.double()) * support[j])
    # Terminal rows ignore the entropy term entirely.
    torch.testing.assert_close(
        with_alpha[terminated],
        soft_distributional_target(
            probs,
            reward,
            terminated,
            torch.zeros(B, dtype=torch.float64),
            torch.tensor(0.0, dtype=torch.float64),
            GAMMA,
            support,
            v_min,
            v_max,
        )[terminated],
    )


def test_item8_zero_alpha_is_distributional_crossq() -> None:
    v_min, v_max, k = -5.0, 5.0, 11
    support = torch.linspace(v_min, v_max, k)
    probs = torch.randn(2, B, k).softmax(-1)
    reward, terminated = torch.randn(B), torch.rand(B) < 0.3
    zero = torch.tensor(0.0)
    a = soft_distributional_target(
        probs, reward, terminated, torch.randn(B) * 5, zero, GAMMA, support, v_min, v_max
    )
    b = soft_distributional_target(
        probs, reward, terminated, torch.randn(B) * 5, zero, GAMMA, support, v_min, v_max
    )
    assert torch.equal(a, b)
    # Plain distributional CrossQ target: project r + γ(1−d) z.
    shifted = reward[:, None] + GAMMA * (1 - terminated.float())[:, None] * support
    torch.testing.assert_close(a, project_distribution(probs, shifted, v_min, v_max, k).mean(0))

    # The same through critic_loss: with α = 0 the next log-prob has no influence, with α > 0 it has.
    critic = make_critic()
    batch = make_batch()
    next_action = torch.rand(B, ACTION_DIM) * 1.8 - 0.9
    losses = {}
    for alpha in (0.0, 0.5):
        for name, log_prob in (("lp1", torch.randn(B) * 3), ("lp2", torch.randn(B) * 3 + 4)):
            losses[alpha, name] = critic_loss(
                copy.deepcopy(critic),
                FixedNextActor(next_action, log_prob),
                batch,
                torch.tensor(alpha),
                GAMMA,
            )["loss_critic"].detach()
    assert torch.equal(losses[0.0, "lp1"], losses[0.0, "lp2"])
    assert not torch.allclose(losses[0.5, "lp1"], losses[0.5, "lp2"])


def test_categorical_cross_entropy_matches_manual() -> None:
    logits = torch.randn(2, B, 11, dtype=torch.float64) * 2
    target = torch.randn(B, 11, dtype=torch.float64).softmax(-1)
    loss, cross_entropy, entropy = categorical_cross_entropy(logits, target, 0.005)
    p = logits.softmax(-1)
    manual_ce = -(target * torch.log(p + 1e-15)).sum(-1).mean(-1)  # the reference's floored log
    manual_h = -(p * torch.log(p + 1e-15)).sum(-1).mean(-1)
    assert cross_entropy.shape == entropy.shape == (2,)
    torch.testing.assert_close(cross_entropy.double(), manual_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy.double(), manual_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), (manual_ce - 0.005 * manual_h).sum(), rtol=1e-5, atol=1e-6)
    assert loss.dtype == torch.float64  # at least float32: float64 input stays float64 ...
    low, _, _ = categorical_cross_entropy(logits.bfloat16(), target.bfloat16(), 0.005)
    assert low.dtype == torch.float32  # ... and bf16 (autocast) input is computed in float32
    torch.testing.assert_close(low.double(), loss, rtol=3e-2, atol=0.0)


def test_categorical_cross_entropy_gradient() -> None:
    """With coef 0, d loss / d logits_i = (softmax_i − target)/B per critic (the target sums to 1)."""
    logits = torch.randn(2, B, 7, requires_grad=True)
    target = torch.randn(B, 7).softmax(-1)
    loss, _, _ = categorical_cross_entropy(logits, target, 0.0)
    loss.backward()
    torch.testing.assert_close(logits.grad, (logits.detach().softmax(-1) - target) / B)
    # The entropy bonus pushes towards flatter outputs: a positive coefficient lowers the loss.
    lower, _, _ = categorical_cross_entropy(logits.detach(), target, 0.5)
    assert lower < loss.detach()


# ---------------------------------------------------------------------------------------------------------
# Item 10: temperature
# ---------------------------------------------------------------------------------------------------------


def test_item10_temperature_init_and_default_target() -> None:
    temperature = Temperature(ACTION_DIM)
    assert temperature.alpha().item() == 1.0
    assert temperature.log_alpha.item() == 0.0
    assert temperature.log_alpha.requires_grad
    assert temperature.target == 4.0 * ACTION_DIM
    assert temperature.lr == 1e-3
    assert temperature.alpha().grad_fn is None  # detached tensor, not a float
    assert isinstance(temperature.alpha(), torch.Tensor)
    assert Temperature(5, init_alpha=0.1).alpha().item() == pytest.approx(0.1, rel=1e-6)
    assert Temperature(5).target == 20.0


@pytest.mark.parametrize("init_alpha", [1.0, 0.2, 3.0])
@pytest.mark.parametrize("statistic", [12.5, 8.0, -4.0])
def test_item10_temperature_gradient_formula(init_alpha: float, statistic: float) -> None:
    temperature = Temperature(ACTION_DIM, init_alpha=init_alpha)
    stat = torch.tensor(statistic, requires_grad=True)
    loss = temperature.loss(stat)
    loss.backward()
    target = 4.0 * ACTION_DIM
    torch.testing.assert_close(loss.detach(), torch.tensor(-init_alpha * (statistic - target)))
    torch.testing.assert_close(temperature.log_alpha.grad, torch.tensor(-init_alpha * (statistic - target)))
    assert stat.grad is None  # the statistic is stop-grad


@pytest.mark.parametrize(("statistic", "rises"), [(10.0, True), (6.0, False)])
def test_item10_alpha_moves_in_the_right_direction_under_adam(statistic: float, rises: bool) -> None:
    temperature = Temperature(ACTION_DIM)  # target 4D = 8
    optimizer = torch.optim.Adam([temperature.log_alpha], lr=temperature.lr)
    values = [temperature.alpha().item()]
    for _ in range(3):
        optimizer.zero_grad()
        temperature_loss(temperature, torch.tensor(statistic))["loss_alpha"].backward()
        optimizer.step()
        values.append(temperature.alpha().item())
    steps = torch.tensor(values).log().diff()
    if rises:
        assert (steps > 0).all()
    else:
        assert (steps < 0).all()
    # Adam's first steps have magnitude ≈ lr in log α.
    torch.testing.assert_close(steps.abs(), torch.full((3,), 1e-3), rtol=1e-2, atol=0)


def test_item10_fixed_mode_has_no_gradient() -> None:
    temperature = Temperature(ACTION_DIM, init_alpha=1e-3, mode="fixed")
    assert not temperature.log_alpha.requires_grad
    assert temperature.alpha().item() == pytest.approx(1e-3, rel=1e-6)
    loss = temperature.loss(torch.tensor(100.0))
    assert not loss.requires_grad
    with pytest.raises(RuntimeError):
        loss.backward()
    assert temperature.log_alpha.grad is None
    assert [p for p in temperature.parameters() if p.requires_grad] == []


def test_item10_custom_target_is_honoured() -> None:
    temperature = Temperature(ACTION_DIM, target=-3.0)
    assert temperature.target == -3.0
    temperature.loss(torch.tensor(-3.0)).backward()
    assert temperature.log_alpha.grad.item() == 0.0
    temperature.log_alpha.grad = None
    temperature.loss(torch.tensor(0.0)).backward()
    assert temperature.log_alpha.grad.item() == pytest.approx(-3.0)
    assert Temperature(ACTION_DIM, target_per_dim=1.5).target == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [(dict(init_alpha=0.0), "init_alpha"), (dict(mode="const"), "mode"), (dict(lr=0.0), "lr")],
)
def test_temperature_invalid_arguments_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Temperature(ACTION_DIM, **kwargs)


def test_temperature_loss_tensordict() -> None:
    temperature = Temperature(ACTION_DIM, init_alpha=2.0)
    out = temperature_loss(temperature, torch.tensor(9.0))
    assert out.batch_size == torch.Size([])
    torch.testing.assert_close(out["loss_alpha"].detach(), torch.tensor(-2.0 * (9.0 - 8.0)))
    assert out["loss_alpha"].requires_grad
    assert not out["alpha"].requires_grad
    torch.testing.assert_close(out["alpha"], torch.tensor(2.0))


# ---------------------------------------------------------------------------------------------------------
# Item 12: gradient isolation between actor, critic and temperature
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def agent() -> tuple[DiffusionActor, DistributionalCritic, Temperature, TensorDict]:
    actor, critic, temperature = make_actor(), make_critic(), Temperature(ACTION_DIM)
    batch = make_batch()
    critic.train()
    for _ in range(3):  # past the BRN warm-up, running stats populated
        critic(torch.randn(2 * B, OBS_DIM), torch.rand(2 * B, ACTION_DIM) * 2 - 1)
    return actor, critic, temperature, batch


class TableCritic(nn.Module):
    """Stand-in critic with Q values given per critic and state (C, B); records how it was queried."""

    def __init__(self, q: torch.Tensor) -> None:
        super().__init__()
        self.q, self.queries, self.is_frozen = q, [], False

    @contextlib.contextmanager
    def frozen(self):
        self.is_frozen = True
        yield
        self.is_frozen = False

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        self.queries.append((action, self.is_frozen))
        return self.q.unsqueeze(-1)  # (C, B) -> (C, B, 1): one "atom" per critic and state

    @staticmethod
    def q_values(logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1)


def test_actor_loss_on_hand_computed_values() -> None:
    """L_π = mean_b[−mean_c Q_c(s_b, a_b) + α log π̂(a_b|s_b)] on numbers worked out by hand: Q per critic
    [[1, 3], [2, 5]] → mean over critics [1.5, 4]; log π̂ = [1, −2]; α = 0.5:
    L = mean(−1.5 + 0.5, −4 − 1) = −3 (the minimum over critics would give −2.25, a sum −6)."""
    action = torch.tensor([[0.5, -0.2], [0.1, 0.3]])
    log_prob = torch.tensor([1.0, -2.0], requires_grad=True)
    sample = ActorOutput(action, log_prob, torch.tensor([0.5, -1.5]), torch.tensor([0.5, -0.5]), torch.atanh(action))
    critic = TableCritic(torch.tensor([[1.0, 3.0], [2.0, 5.0]]))
    out = actor_loss(lambda obs: sample, critic, torch.zeros(2, OBS_DIM), torch.tensor(0.5))
    assert out["loss_actor"].item() == pytest.approx(-3.0)
    assert out["policy_q_mean"].item() == pytest.approx(2.75)
    assert out["log_prob"].item() == pytest.approx(-0.5)
    assert out["running_cost"].item() == pytest.approx(-0.5) and out["terminal_cost"].item() == pytest.approx(0.0)
    (queried, was_frozen), = critic.queries
    assert queried is action and was_frozen  # the sampled action, under the frozen critic
    out["loss_actor"].backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.25, 0.25]))  # ∂L/∂log π̂_b = α / B


def test_actor_loss_queries_the_critic_with_its_running_statistics(agent) -> None:
    actor, critic, _, batch = agent
    torch.manual_seed(7)
    out = actor_loss(actor, critic, batch["observation"], torch.tensor(0.3))
    torch.manual_seed(7)
    sample = actor(batch["observation"])
    frozen = copy.deepcopy(critic).eval()
    q = frozen.q_values(frozen(batch["observation"], sample.action)).mean(0)
    torch.testing.assert_close(out["policy_q_mean"], q.mean())
    assert critic.training  # the frozen context restored train mode


def test_the_three_losses_name_their_diagnostics_apart(agent) -> None:
    """The update merges the losses' outputs into one dict: a name used twice would drop one value."""
    actor, critic, temperature, batch = agent
    outputs = [critic_loss(critic, actor, batch, temperature.alpha(), GAMMA),
               actor_loss(actor, critic, batch["observation"], temperature.alpha()),
               temperature_loss(temperature, torch.tensor(1.0))]
    names = [set(out.keys()) for out in outputs]
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert not names[i] & names[j], names[i] & names[j]
    assert "q_mean" in names[0] and "policy_q_mean" in names[1]


def test_item12_actor_loss_reaches_actor_only(agent) -> None:
    actor, critic, temperature, batch = agent
    out = actor_loss(actor, critic, batch["observation"], temperature.alpha())
    out["loss_actor"].backward()
    actor_grads = grads(actor)
    assert all(g is not None for g in actor_grads.values()), [n for n, g in actor_grads.items() if g is None]
    head = next(name for name in actor_grads if name.endswith("head.weight"))  # the control net's last layer
    assert actor_grads["dt_param"].abs() > 0 and actor_grads[head].abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in actor_grads.values())
    assert_no_grads(critic)
    assert all(p.grad is None for p in critic.parameters())
    assert temperature.log_alpha.grad is None


def test_item12_actor_step_changes_no_critic_parameter_or_brn_statistic(agent) -> None:
    actor, critic, temperature, batch = agent
    critic_before, actor_before = state(critic), state(actor)
    optimizer = adam(actor.parameters(), lr=3e-4)
    for _ in range(2):
        optimizer.zero_grad()
        actor_loss(actor, critic, batch["observation"], temperature.alpha())["loss_actor"].backward()
        zero_nan_and_clip_gradients_(actor.parameters())
        optimizer.step()
    assert_state_equal(critic_before, critic)  # parameters and running_mean/var/num_batches_tracked
    assert critic.training
    changed = [k for k, v in actor.state_dict().items() if not torch.equal(v, actor_before[k])]
    assert "dt_param" in changed and any(name.endswith("head.weight") for name in changed)


def test_item12_critic_loss_reaches_critic_only(agent) -> None:
    actor, critic, temperature, batch = agent
    out = critic_loss(critic, actor, batch, temperature.alpha(), GAMMA)
    out["loss_critic"].backward()
    critic_grads = grads(critic)
    assert all(g is not None for g in critic_grads.values()), [
        n for n, g in critic_grads.items() if g is None
    ]
    assert sum(float(g.abs().sum()) for g in critic_grads.values()) > 0
    assert all(p.grad is None for p in actor.parameters())
    assert temperature.log_alpha.grad is None


def test_item12_critic_step_changes_no_actor_parameter(agent) -> None:
    actor, critic, temperature, batch = agent
    actor_before, critic_before = state(actor), state(critic)
    optimizer = adam(critic.parameters(), lr=3e-4)
    for _ in range(2):
        optimizer.zero_grad()
        critic_loss(critic, actor, batch, temperature.alpha(), GAMMA)["loss_critic"].backward()
        optimizer.step()
    assert_state_equal(actor_before, actor)
    assert temperature.log_alpha.item() == 0.0
    changed = [k for k, v in critic.state_dict().items() if not torch.equal(v, critic_before[k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("running_mean") for k in changed)


def test_item12_alpha_loss_reaches_log_alpha_only(agent) -> None:
    actor, critic, temperature, batch = agent
    sample = actor(batch["observation"])
    # Pass the running cost *with* its graph: the temperature loss must stop-grad it.
    out = temperature_loss(temperature, sample.running_cost.mean())
    out["loss_alpha"].backward()
    assert temperature.log_alpha.grad is not None and temperature.log_alpha.grad.abs() > 0
    assert all(p.grad is None for p in actor.parameters())
    assert all(p.grad is None for p in critic.parameters())


# ---------------------------------------------------------------------------------------------------------
# Optimizer helpers
# ---------------------------------------------------------------------------------------------------------


def test_zero_nan_and_clip_gradients() -> None:
    p = nn.Parameter(torch.zeros(8))
    p.grad = torch.tensor([math.nan, math.inf, -math.inf, 0.5, 2.0, -3.0, -1.0, 1.0])
    q = nn.Parameter(torch.zeros(2, 2))
    q.grad = torch.tensor([[math.nan, -0.25], [7.0, 0.0]])
    untouched = nn.Parameter(torch.zeros(3))  # grad None must be skipped
    zero_nan_and_clip_gradients_([p, q, untouched])
    assert torch.equal(p.grad, torch.tensor([0.0, 1.0, -1.0, 0.5, 1.0, -1.0, -1.0, 1.0]))
    assert torch.equal(q.grad, torch.tensor([[0.0, -0.25], [1.0, 0.0]]))
    assert untouched.grad is None
    # Element-wise, not global-norm: a different clip value.
    p.grad = torch.tensor([math.nan, math.inf, -math.inf, 0.1, 0.3, -0.7, 5.0, -0.2])
    zero_nan_and_clip_gradients_([p], clip=0.25)
    assert torch.equal(p.grad, torch.tensor([0.0, 0.25, -0.25, 0.1, 0.25, -0.25, 0.25, -0.2]))


def test_adam_conventions_and_gradient_norm() -> None:
    trainable, frozen = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2), requires_grad=False)
    optimizer = adam([trainable, frozen], lr=3e-4)
    group = optimizer.param_groups[0]
    assert group["betas"] == ACTOR_CRITIC_BETAS == (0.5, 0.999)
    assert group["lr"] == 3e-4
    assert len(group["params"]) == 1 and group["params"][0] is trainable
    with pytest.raises(BadInputError, match=r"model\.update\.actor_lr must be a finite float > 0"):
        UpdateSettings(actor_lr=0.0)  # checked with the other settings, before any optimizer is built
    trainable.grad = torch.tensor([3.0, 0.0])
    other = nn.Parameter(torch.zeros(1))
    other.grad = torch.tensor([4.0])
    torch.testing.assert_close(gradient_norm([trainable, other, frozen]), torch.tensor(5.0))
    torch.testing.assert_close(gradient_norm([frozen]), torch.tensor(0.0))
