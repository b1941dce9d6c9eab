"""The DIME diffusion actor: an Euler–Maruyama sampler with a variational bound on log π (docs/algorithm.md §1).

Chain order follows the sampler convention: x_0 is prior noise, x_N the pre-tanh action.

    generative kernel  F(x_{n+1} | x_n, s) = N(x_n + η_n (−x_n/σ0² + u(x_n, s, n)), 2 η_n)
    noising kernel     B(x_n | x_{n+1})    = N(x_{n+1} + η_n (−x_{n+1}/σ0²),     2 η_n)

    log π̂(a|s) = running_cost + terminal_cost,  running_cost = −(Σ_n log B − log F) − log|det ∂a/∂x_N|,
                                                terminal_cost = log p_0(x_0)

E[log π̂] ≥ E[log π], so −E[log π̂] is a lower bound on the policy entropy (paper Thm. on the MaxEnt bound).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dime_lightning.errors import BadInputError
from dime_lightning.layers import dense
from dime_lightning.policy import LOG_2PI, ActorOutput, SamplesFromForward, tanh_log_det_jacobian


def cosine_step_profile(num_steps: int, s: float = 0.008, minimum: float = 0.001) -> torch.Tensor:
    """Relative step sizes c(n), n = 0..N−1: large near the prior, tiny near the action (docs/algorithm.md §1.2)."""
    n = torch.arange(num_steps, dtype=torch.float64)
    tau = (num_steps - n) / num_steps
    profile = (1.0 - minimum) * torch.cos(0.5 * math.pi * (1.0 + s - tau) / (1.0 + s)) ** 2 + minimum
    return profile.float()


def inverse_softplus(value: float) -> float:
    """θ such that softplus(θ) = value."""
    if value <= 0:
        raise BadInputError(f"inverse_softplus needs a positive value, got {value}")
    return value + math.log(-math.expm1(-value))


class FourierTimeEmbedding(nn.Module):
    """[sin(ω n + φ), cos(ω n + φ)] with fixed ω = linspace(f_min, f_max, F) and a learned phase φ (init 0)."""

    def __init__(self, num_features: int = 256, min_freq: float = 0.1, max_freq: float = 100.0) -> None:
        super().__init__()
        self.register_buffer("frequencies", torch.linspace(min_freq, max_freq, num_features))
        self.phase = nn.Parameter(torch.zeros(num_features))

    def forward(self, step_index: torch.Tensor) -> torch.Tensor:
        angles = step_index.unsqueeze(-1) * self.frequencies + self.phase  # (..., F)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (..., 2F)


class ControlNetwork(nn.Module):
    """u_θ(x, s, n): the learned drift correction ("PISGRADNet"-style, docs/algorithm.md §1.4).

    MLP on concat(x, s, time code(n)); the step index n enters as a raw float (0..N−1). The first layer is
    stored as three blocks (x, s, time code) initialised as one LeCun-normal layer on the concatenation, so
    the sampler can compute the s and time-code parts once per chain (``context``) instead of once per step.
    The last layer starts at the constant ``last_layer_init``: u ≈ 0, the initial chain is Langevin on p_0.
    """

    def __init__(
        self,
        action_dim: int,
        obs_dim: int,
        hidden_dim: int = 256,
        num_layers: int = 3,
        time_features: int = 256,
        time_hidden_dim: int = 256,
        min_freq: float = 0.1,
        max_freq: float = 100.0,
        last_layer_init: float = 1e-8,
        output_clip: float = 1e4,
    ) -> None:
        super().__init__()
        self.output_clip = output_clip
        self.time_embedding = FourierTimeEmbedding(time_features, min_freq, max_freq)
        self.time_mlp = nn.Sequential(
            dense(2 * time_features, time_hidden_dim),
            nn.GELU(approximate="tanh"),
            dense(time_hidden_dim, time_hidden_dim),
        )
        fan_in = action_dim + obs_dim + time_hidden_dim
        self.input_x = dense(action_dim, hidden_dim, fan_in=fan_in)
        self.input_obs = dense(obs_dim, hidden_dim, bias=False, fan_in=fan_in)
        self.input_time = dense(time_hidden_dim, hidden_dim, bias=False, fan_in=fan_in)
        layers: list[nn.Module] = [nn.GELU(approximate="tanh")]
        for _ in range(num_layers - 1):
            layers += [dense(hidden_dim, hidden_dim), nn.GELU(approximate="tanh")]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(hidden_dim, action_dim)
        nn.init.constant_(self.head.weight, last_layer_init)
        nn.init.zeros_(self.head.bias)

    def context(self, obs: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """First-layer contribution of the state and the time code: obs (B, S), step_index (N,) -> (N, B, H)."""
        time_part = self.input_time(self.time_mlp(self.time_embedding(step_index)))  # (N, H)
        return self.input_obs(obs) + time_part.unsqueeze(-2)  # (B, H) + (N, 1, H) -> (N, B, H)

    def step(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """u for one step given that step's ``context`` (B, H): x (B, D) -> (B, D)."""
        u = self.head(self.trunk(self.input_x(x) + context))
        return u.clamp(-self.output_clip, self.output_clip)

    def forward(self, x: torch.Tensor, obs: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        return self.step(x, self.context(obs, step_index.reshape(1))[0])


class DiffusionActor(SamplesFromForward, nn.Module):
    """DIME's diffusion policy: 16 Euler–Maruyama steps from N(0, σ0² I), tanh-squashed.

    Learned parameters: the control network, a scalar step parameter θ_dt (softplus(θ_dt) = ``init_dt``)
    and a per-dimension friction θ_φ (softplus(θ_φ) = ``init_friction``). Effective step η_{n,d} =
    softplus(θ_dt)·c(n) / softplus(θ_φ,d), noise std sqrt(2η). Everything is graph-friendly: no host syncs,
    no branches on tensor values. docs/algorithm.md §1.

    Args:
        obs_dim: observation size; linked from the env (never set in a config).
        action_dim: action size D; linked from the env (never set in a config).
        num_steps: diffusion steps N of the sampler, >= 1. Default 16.
        prior_std: standard deviation σ0 of the fixed prior N(0, σ0² I), > 0. Default 2.5.
        init_dt: initial step scale softplus(θ_dt), > 0. Default 0.1.
        learn_dt: learn the step scale θ_dt. Default true.
        init_friction: initial per-dimension friction softplus(θ_φ), > 0. Default 1.
        learn_friction: learn the friction θ_φ. Default true.
        hidden_dim: width of the control network's main MLP. Default 256.
        num_layers: GELU layers of the control network's main MLP, >= 1. Default 3.
        time_features: Fourier frequencies of the time code (it has twice as many values). Default 256.
        time_hidden_dim: width of the time-code MLP. Default 256.
        min_freq: lowest Fourier frequency (per step index). Default 0.1.
        max_freq: highest Fourier frequency (per step index). Default 100.
        last_layer_init: constant the control network's last-layer weights start at (u ≈ 0). Default 1e-8.
        control_clip: the control u is clipped to [−c, c]. Default 1e4.
        schedule_s: offset s of the cosine step profile c(n). Default 0.008.
        schedule_min: floor m of the cosine step profile c(n). Default 0.001.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        num_steps: int = 16,
        prior_std: float = 2.5,
        init_dt: float = 0.1,
        learn_dt: bool = True,
        init_friction: float = 1.0,
        learn_friction: bool = True,
        hidden_dim: int = 256,
        num_layers: int = 3,
        time_features: int = 256,
        time_hidden_dim: int = 256,
        min_freq: float = 0.1,
        max_freq: float = 100.0,
        last_layer_init: float = 1e-8,
        control_clip: float = 1e4,
        schedule_s: float = 0.008,
        schedule_min: float = 0.001,
    ) -> None:
        super().__init__()
        for name, value, low in [("obs_dim", obs_dim, 1), ("action_dim", action_dim, 1), ("num_steps", num_steps, 1)]:
            if value < low:
                raise BadInputError(f"DiffusionActor: {name} must be >= {low}, got {value}")
        for name, value in [("prior_std", prior_std), ("init_dt", init_dt), ("init_friction", init_friction)]:
            if not value > 0:
                raise BadInputError(f"DiffusionActor: {name} must be > 0, got {value}")
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.num_steps = num_steps
        self.prior_std = prior_std
        self.control_net = ControlNetwork(
            action_dim, obs_dim, hidden_dim, num_layers, time_features, time_hidden_dim,
            min_freq, max_freq, last_layer_init, control_clip,
        )
        self.dt_param = nn.Parameter(torch.tensor(inverse_softplus(init_dt)), requires_grad=learn_dt)
        self.friction_param = nn.Parameter(
            torch.full((action_dim,), inverse_softplus(init_friction)), requires_grad=learn_friction
        )
        self.register_buffer("step_profile", cosine_step_profile(num_steps, schedule_s, schedule_min))
        self.register_buffer("step_indices", torch.arange(num_steps, dtype=torch.float32))

    def __setattr__(self, name: str, value) -> None:
        if name == "control":  # nn.Module would register a module value as a child named "control"
            type(self).control.fset(self, value)
        else:
            super().__setattr__(name, value)

    @property
    def control(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """u(x, obs, step_index) -> (B, D): the control network, or a callable that replaced it."""
        return self.__dict__.get("_control_override") or self.control_net

    @control.setter
    def control(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        if isinstance(fn, nn.Module):  # a child module: its parameters train and are checkpointed with the actor
            self.control_net = fn
            self.__dict__.pop("_control_override", None)
        else:  # any callable, e.g. u = −k·x + b in the Gaussian-case tests
            self.__dict__["_control_override"] = fn

    @property
    def precomputes_context(self) -> bool:
        """Whether the sampler takes the built-in network's fast path (the state and time parts of its first
        layer once per chain, ``ControlNetwork.context``): a ``ControlNetwork`` whose ``forward`` is its own.
        Any other control is called as ``control(x, obs, step_index)`` at every step."""
        control = self.control
        return isinstance(control, ControlNetwork) and type(control).forward is ControlNetwork.forward

    @torch.no_grad()
    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Detached scalars for logging: the learned step size softplus(θ_dt) and the mean friction."""
        return {"step_size": F.softplus(self.dt_param), "friction_mean": F.softplus(self.friction_param).mean()}

    def step_sizes(self) -> torch.Tensor:
        """η_{n,d} = softplus(θ_dt)·c(n) / softplus(θ_φ,d), shape (N, D)."""
        dt = F.softplus(self.dt_param) * self.step_profile.to(self.dt_param.dtype)  # (N,)
        return dt.unsqueeze(-1) / F.softplus(self.friction_param)  # (N, 1) / (D,) -> (N, D)

    def forward(
        self, obs: torch.Tensor, return_trajectory: bool = False, noise: torch.Tensor | None = None
    ) -> ActorOutput:
        """Sample one action per state with gradients through every step (backprop through time).

        ``noise`` (N+1, B, D) of standard normals fixes the randomness: row 0 draws x_0, row n+1 the
        noise of step n. Without it, fresh noise is drawn.
        """
        batch = obs.shape[0]
        dtype = self.dt_param.dtype
        if noise is None:
            noise = torch.randn(self.num_steps + 1, batch, self.action_dim, device=obs.device, dtype=dtype)
        inv_var0 = 1.0 / self.prior_std**2
        eta = self.step_sizes()  # (N, D)
        x = self.prior_std * noise[0]  # (B, D)
        terminal_cost = (-0.5 * noise[0].pow(2) - math.log(self.prior_std) - 0.5 * LOG_2PI).sum(-1)
        log_w = torch.zeros(batch, device=obs.device, dtype=dtype)
        chain = [x]
        control = self.control
        steps = self.step_indices.to(dtype)
        fast = self.precomputes_context
        if fast:  # the built-in network: state and time parts of layer 1 once per chain
            context = control.context(obs, steps)  # (N, B, H)
        for n in range(self.num_steps):
            eta_n = eta[n]
            u = control.step(x, context[n]) if fast else control(x, obs, steps[n])
            u = u.to(dtype)  # under autocast the network computes in bf16; the chain and its costs stay float32
            x_next = x + eta_n * (u - x * inv_var0) + torch.sqrt(2.0 * eta_n) * noise[n + 1]
            backward_mean = x_next * (1.0 - eta_n * inv_var0)
            # log B(x_n | x_{n+1}) − log F(x_{n+1} | x_n): the normalisers cancel (same variance 2η_n), and
            # (x_{n+1} − mean_F)/sqrt(2η_n) is exactly the step noise.
            log_w = log_w + (0.5 * noise[n + 1].pow(2) - (x - backward_mean).pow(2) / (4.0 * eta_n)).sum(-1)
            x = x_next
            chain.append(x)
        running_cost = -(log_w + tanh_log_det_jacobian(x))
        return ActorOutput(
            action=torch.tanh(x),
            log_prob=running_cost + terminal_cost,
            running_cost=running_cost,
            terminal_cost=terminal_cost,
            pre_tanh=x,
            trajectory=torch.stack(chain) if return_trajectory else None,
        )
