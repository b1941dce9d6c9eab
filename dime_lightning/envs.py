"""Environments: the one place env ids are read.

Accepted ids:
- any registered Gymnasium id with a bounded continuous (Box) action space, e.g. the MuJoCo v5 tasks
  ``HalfCheetah-v5``, ``Hopper-v5``, ``Walker2d-v5``, ``Ant-v5``, ``Humanoid-v5`` or ``Pendulum-v1``, also as
  ``module:EnvName-vN`` for an env that ``module`` registers on import (Gymnasium's convention);
- the multimodal toy tasks ``MultimodalBandit-v0``, ``MultiGoal-v0`` and ``MultiGoalHaarnoja-v0`` (the
  standard multi-goal task of soft Q-learning; ``toy_envs.py``);
- DeepMind Control Suite tasks as ``dm_control/<domain>-<task>`` (e.g. ``dm_control/dog-run``), which need
  the ``dmc`` extra (``pip install 'dime-lightning[dmc]'``);
- MyoSuite tasks by their registered ids (``myoHandKeyTurnRandom-v0``, ``myoHandObjHoldRandom-v0``,
  ``myoHandPenTwirlRandom-v0``, ``myoHandReachRandom-v0``, …; ids start with ``myo``), which need the ``myo``
  extra; ``myosuite`` is imported (it registers them) only for such ids. Their own time limits apply (200, 75,
  50 and 100 steps for these four) and their own early termination (a dropped object).

Training in one process steps a Gymnasium id's env directly (``make_gymnasium_env``: Gymnasium's own
``RescaleAction`` and ``RecordEpisodeStatistics``; ``collection.InProcessCollector``), with the same
transitions as the TorchRL env below (tested). Every other env (evaluation, DMC, env workers) is a TorchRL
``TransformedEnv`` with: a single float32 ``observation`` vector (DMC's observation
dict is concatenated in key order), actions in [−1, 1] mapped affinely to the env bounds
(``ActionScaling``), ``terminated`` kept apart from ``truncated`` (time limits truncate, they never
terminate), and the running episode return in ``episode_reward``. ``make_env(..., success=True)`` (the
evaluation env) also carries ``success``, a bool per step, for envs that report one: MyoSuite's ``solved``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import gymnasium
import numpy as np
import torch
from torchrl.data import Unbounded
from torchrl.envs import (
    ActionScaling,
    CatTensors,
    DoubleToFloat,
    EnvBase,
    GymEnv,
    GymWrapper,
    RewardSum,
    StepCounter,
    TransformedEnv,
)
from torchrl.envs.gym_like import default_info_dict_reader

from dime_lightning.errors import EnvIdError
from dime_lightning.toy_envs import register_toy_envs

T = TypeVar("T")

DMC_PREFIX = "dm_control/"
MYO_PREFIX = "myo"  # MyoSuite's ids (myoHand…, myoElbow…, myoChallenge…), registered by `import myosuite`
SUCCESS_KEY = "success"  # the evaluation env's per-step success flag (make_env(success=True))
ACCEPTED_FORMS = (
    "a Gymnasium id with a continuous Box action space (e.g. 'Pendulum-v1', 'HalfCheetah-v5', 'Hopper-v5', "
    "'Walker2d-v5', 'Ant-v5', 'Humanoid-v5', 'MultimodalBandit-v0', 'MultiGoal-v0', 'MultiGoalHaarnoja-v0'), "
    "'dm_control/<domain>-<task>' (e.g. 'dm_control/dog-run') or a MyoSuite id (e.g. 'myoHandReachRandom-v0')"
)
MYO_HINT = "pip install 'dime-lightning[myo]' (from a checkout: pip install -e '.[dev,dmc,myo]')"


@dataclass(frozen=True)
class EnvSpec:
    """What the model needs to know about an env: dimensions only, never read from YAML."""

    env_id: str
    obs_dim: int
    action_dim: int


def _dmc_domain_task(env_id: str) -> tuple[str, str]:
    name = env_id[len(DMC_PREFIX):]
    domain, sep, task = name.partition("-")
    if not sep or not domain or not task:
        raise EnvIdError(f"env id {env_id!r}: DMC ids must look like 'dm_control/<domain>-<task>'")
    try:
        from dm_control import suite
    except ImportError as err:
        raise EnvIdError(
            f"env id {env_id!r} needs dm_control, which is not installed: "
            "pip install 'dime-lightning[dmc]' (or pip install dm_control)"
        ) from err
    _check_mujoco_below_4(env_id)
    if (domain, task) not in set(suite.ALL_TASKS):
        known = ", ".join(f"{d}-{t}" for d, t in suite.ALL_TASKS[:12])
        raise EnvIdError(f"env id {env_id!r}: unknown DMC task {domain}-{task}; known tasks include {known}, …")
    return domain, task


def _check_mujoco_below_4(env_id: str) -> None:
    import mujoco

    if int(str(mujoco.__version__).split(".")[0]) >= 4:
        raise EnvIdError(
            f"env id {env_id!r}: dm_control does not work with MuJoCo {mujoco.__version__} (it needs MuJoCo 3.x); "
            "pip uninstall -y mujoco mujoco-core mujoco-studio && pip install -e '.[dev,dmc,myo]'"
        )


def is_myosuite(env_id: str) -> bool:
    """Whether ``env_id`` names a MyoSuite task (``myoHandReachRandom-v0``, also as ``myosuite:<id>``)."""
    module, _, name = env_id.rpartition(":")
    return module == "myosuite" or (not module and name.startswith(MYO_PREFIX))


def _import_myosuite(env_id: str) -> None:
    try:
        importlib.import_module("myosuite")  # registers its ids with Gymnasium
    except ImportError as err:
        raise EnvIdError(f"env id {env_id!r} is a MyoSuite task and needs myosuite, which is not installed "
                         f"({err}): {MYO_HINT}") from err


def check_env_id(env_id: str) -> None:
    """Fail fast (before anything heavy) if ``env_id`` is not one of the accepted forms."""
    if not isinstance(env_id, str) or not env_id:
        raise EnvIdError(f"env id must be a non-empty string; accepted: {ACCEPTED_FORMS}")
    if env_id.startswith(DMC_PREFIX):
        _dmc_domain_task(env_id)
        return
    register_toy_envs()
    module, _, name = env_id.rpartition(":")
    if is_myosuite(env_id):
        _import_myosuite(env_id)
    elif module:  # "package.module:EnvName-v0": importing the module registers the env
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise EnvIdError(f"env id {env_id!r}: cannot import module {module!r} ({err})") from err
    try:
        gymnasium.spec(name)
    except gymnasium.error.Error as err:
        raise EnvIdError(f"unknown env id {env_id!r} ({err}); accepted: {ACCEPTED_FORMS}") from err


class SolvedAsSuccess(gymnasium.Wrapper):
    """MyoSuite's ``solved`` (a bool, an int or a numpy bool, depending on the task) as the step info
    ``{"success": np.bool_}``, the only info key, in the form TorchRL's info reader takes."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if "solved" not in info:
            raise EnvIdError(f"MyoSuite env {self.env.spec.id if self.env.spec else self.env!r} reports no 'solved' "
                             "in its step info, so eval/success_rate cannot be computed for it")
        return obs, reward, terminated, truncated, {SUCCESS_KEY: np.asarray(bool(np.asarray(info["solved"])))}


def _created(env_id: str, make: Callable[[], T]) -> T:
    """``make()``, its failure reported as an ``EnvIdError`` naming ``env_id`` (gymnasium raises many types:
    missing extras, bad kwargs, …)."""
    try:
        return make()
    except Exception as err:
        raise EnvIdError(f"env id {env_id!r} could not be created: {err}") from err


def _base_env(env_id: str, device: str, success: bool) -> EnvBase:
    if env_id.startswith(DMC_PREFIX):
        from torchrl.envs import DMControlEnv

        domain, task = _dmc_domain_task(env_id)
        return DMControlEnv(domain, task, device=device)
    check_env_id(env_id)
    if not (success and is_myosuite(env_id)):
        return _created(env_id, lambda: GymEnv(env_id, device=device))
    env = _created(env_id, lambda: GymWrapper(SolvedAsSuccess(gymnasium.make(env_id.rpartition(":")[2])),
                                              device=device))
    env.set_info_dict_reader(default_info_dict_reader([SUCCESS_KEY], spec=[Unbounded((), dtype=torch.bool)]))
    return env


def make_env(env_id: str, seed: int | None = None, device: str = "cpu", success: bool = False) -> TransformedEnv:
    """Build the TorchRL env for ``env_id`` (see the module docstring for the accepted forms).

    env_id: the env id.
    seed: the env's seed, or None.
    device: the device of its tensors.
    success: also carry ``success`` (bool per step) where the env reports one (MyoSuite); for evaluation."""
    base = _base_env(env_id, device, success)
    action_spec = base.action_spec
    if action_spec.dtype not in (torch.float32, torch.float64) or not hasattr(action_spec.space, "low"):
        raise EnvIdError(f"env id {env_id!r}: DIME needs a bounded continuous action space, got {action_spec}")
    if not (torch.isfinite(action_spec.space.low).all() and torch.isfinite(action_spec.space.high).all()):
        raise EnvIdError(f"env id {env_id!r}: the action space must be bounded, got {action_spec}")
    obs_keys = [key for key in base.observation_spec.keys(True, True) if key != SUCCESS_KEY]
    env = TransformedEnv(base)
    if obs_keys != ["observation"]:
        env.append_transform(CatTensors(in_keys=sorted(obs_keys), out_key="observation", del_keys=True))
    env.append_transform(DoubleToFloat())
    env.append_transform(ActionScaling())
    env.append_transform(RewardSum())
    env.append_transform(StepCounter())
    if seed is not None:
        env.set_seed(seed)
    return env


def in_process_gymnasium(env_id: str) -> bool:
    """Whether ``env_id`` is a Gymnasium id (not DMC), which the thin in-process collector steps directly."""
    return not env_id.startswith(DMC_PREFIX)


def make_gymnasium_env(env_id: str) -> gymnasium.Env:
    """The Gymnasium env of a Gymnasium id (checked), as the thin in-process collector steps it: actions in
    [−1, 1] mapped affinely to the env bounds (``RescaleAction``, as ``ActionScaling`` does for ``make_env``),
    the episode's return and length reported at its end (``RecordEpisodeStatistics``). Not yet reset."""
    check_env_id(env_id)
    env = _created(env_id, lambda: gymnasium.make(env_id))
    space = env.action_space
    bounded = isinstance(space, gymnasium.spaces.Box) and np.isfinite(space.low).all() and np.isfinite(space.high).all()
    if not bounded:
        env.close()
        raise EnvIdError(f"env id {env_id!r}: DIME needs a bounded continuous action space, got {space}")
    unit = np.ones(space.shape, dtype=space.dtype)
    return gymnasium.wrappers.RecordEpisodeStatistics(gymnasium.wrappers.RescaleAction(env, -unit, unit))


def env_spec(env_id: str) -> EnvSpec:
    """Dimensions of ``env_id`` (builds the env once and closes it)."""
    env = make_env(env_id)
    try:
        obs_shape = env.observation_spec["observation"].shape
        if len(obs_shape) != 1:
            raise EnvIdError(f"env id {env_id!r}: expected a flat observation vector, got shape {tuple(obs_shape)}")
        return EnvSpec(env_id, int(obs_shape[-1]), int(env.action_spec.shape[-1]))
    finally:
        env.close()
