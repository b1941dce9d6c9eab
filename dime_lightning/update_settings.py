"""``UpdateSettings``: the hyperparameters of DIME's update (docs/algorithm.md §4, §5), declared, documented and
validated here once. The updater (``update.DIMEUpdater``) takes them; the module exposes them as the config group
``model.update`` (``--model.update.utd 4``); checkpoints store them as plain data
(``hyper_parameters["update"]``, ``checkpoint_schema``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dime_lightning.errors import BadInputError
from dime_lightning.optim import ACTOR_CRITIC_BETAS

CompileMode = Literal["auto", "none", "default", "reduce-overhead", "whole"]
COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "whole")
AUTO = "auto"  # resolved at the start of a fit (dime_lightning.auto)
GROUP = "model.update"  # where the settings sit in the fit config


@dataclass(frozen=True)
class UpdateSettings:
    """How DIME updates its networks each env step; the defaults are the paper's settings.

    Args:
        gamma: discount γ of the TD target, in [0, 1]. Default 0.99.
        utd: critic updates per env step (update-to-data ratio), >= 1. Default 2.
        policy_delay: critic updates per actor update, counted globally over critic updates, >= 1. Default 3.
        policy_tau: Polyak rate of the target actor in (0, 1]; 1 (default) refreshes it to the actor after
            every actor update, so no copy is kept.
        actor_lr: Adam learning rate of the actor, > 0. Default 3e-4.
        critic_lr: Adam learning rate of the critics, > 0. Default 3e-4.
        betas: Adam (β1, β2) of actor and critics, each in [0, 1). Default (0.5, 0.999).
        actor_grad_clip: element-wise clip of each actor gradient entry to [−c, c] after NaN → 0, > 0. Default 1.
        critic_entropy_coef: weight of the bonus for the entropy of the critics' output distributions, >= 0.
            Default 0.005.
        check_finite: check every loss for NaN/inf and act as ``nonfinite`` says. Default true.
        nonfinite: on a non-finite loss: 'stop' (exit 3, the last good checkpoint kept) or 'skip' (undo that
            update and go on, counted in ``train/skipped_updates``). Default 'stop'.
        compile: how the update runs: 'auto' (chosen at the start of a fit by device, processes and run length:
            ``dime_lightning.auto``), 'none' (eager), 'default' or 'reduce-overhead' (the losses through
            torch.compile), 'whole' (the whole env-step update as compiled programs; one process only).
            ``dime_lightning.update`` describes each. Default 'auto'.
    """

    gamma: float = 0.99
    utd: int = 2
    policy_delay: int = 3
    policy_tau: float = 1.0
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    betas: tuple[float, float] = ACTOR_CRITIC_BETAS
    actor_grad_clip: float = 1.0
    critic_entropy_coef: float = 0.005
    check_finite: bool = True
    nonfinite: Literal["stop", "skip"] = "stop"
    compile: CompileMode = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.betas, list | tuple):
            object.__setattr__(self, "betas", tuple(self.betas))  # a YAML list or a checkpoint's list
        checks = [
            ("gamma", "a float in [0, 1]", lambda: 0.0 <= self.gamma <= 1.0),
            ("utd", "an int >= 1", lambda: _is_int(self.utd) and self.utd >= 1),
            ("policy_delay", "an int >= 1", lambda: _is_int(self.policy_delay) and self.policy_delay >= 1),
            ("policy_tau", "a float in (0, 1]", lambda: 0.0 < self.policy_tau <= 1.0),
            ("actor_lr", "a finite float > 0", lambda: _positive(self.actor_lr)),
            ("critic_lr", "a finite float > 0", lambda: _positive(self.critic_lr)),
            ("betas", "two floats in [0, 1) (Adam's β1, β2)",
             lambda: len(self.betas) == 2 and all(0.0 <= beta < 1.0 for beta in self.betas)),
            ("actor_grad_clip", "a finite float > 0", lambda: _positive(self.actor_grad_clip)),
            ("critic_entropy_coef", "a finite float >= 0",
             lambda: math.isfinite(self.critic_entropy_coef) and self.critic_entropy_coef >= 0),
            ("check_finite", "true or false", lambda: isinstance(self.check_finite, bool)),
            ("nonfinite", "'stop' or 'skip'", lambda: self.nonfinite in ("stop", "skip")),
            ("compile", f"one of {', '.join(map(repr, COMPILE_MODES))}", lambda: self.compile in COMPILE_MODES),
        ]
        for name, allowed, ok in checks:
            try:
                valid = ok()
            except TypeError:  # a value of another type (a checkpoint's or a mapping's)
                valid = False
            if not valid:
                raise BadInputError(f"{GROUP}.{name} must be {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def of(cls, value: UpdateSettings | Mapping[str, Any] | None) -> UpdateSettings:
        """Settings from themselves, a plain mapping (a checkpoint's, a config's) or None (the defaults); a key
        that is not a setting is named in the error."""
        if value is None or isinstance(value, UpdateSettings):
            return value or cls()
        unknown = sorted(set(value) - set(NAMES))
        if unknown:
            raise BadInputError(f"{GROUP}: unknown setting(s) {unknown}; the settings are {list(NAMES)}")
        return cls(**value)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for checkpoints and configs: loadable with ``weights_only=True``."""
        return {**dataclasses.asdict(self), "betas": list(self.betas)}


NAMES = tuple(field.name for field in dataclasses.fields(UpdateSettings))
# before layout 2 (checkpoint_schema) the settings were the module's own arguments; compile was compile_update
OLD_NAMES = {**{name: name for name in NAMES if name != "compile"}, "compile_update": "compile"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0
