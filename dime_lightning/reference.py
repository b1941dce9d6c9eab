"""Published reference curves shipped with the package, and which env id they belong to.

``paper`` is the DIME authors' per-seed evaluation returns (21 tasks, 10 seeds, an evaluation every 24,000 env
steps, 5 stochastic episodes; provenance in ``reference_data/PROVENANCE.md``)::

    from dime_lightning import reference
    match = reference.reference_task("dm_control/pendulum-swingup")   # ReferenceTask("dmc_pendulum_swingup", ...)
    steps, seeds = reference.reference_seeds(match.task)               # (T,), (T, 10)

DMC ids map directly (``dm_control/cheetah-run`` → ``dmc_cheetah_run``), except acrobot-swingup
(``dmc_acrobot``) and finger-turn_hard (``dmc_finger_turn``, whose folder name does not say easy or hard: the
match carries that note). Gymnasium ``Ant-v5``/``Humanoid-v5`` map to the paper's Gym v3 runs, with the version
mismatch in the note; every plot and table that shows a reference prints the note. The MyoSuite hand tasks map
by name (``myoHandReachRandom-v0`` → ``myo_hand_reach_rndm``); their published values are success rates in
[0, 1], so a run is compared on ``eval/success_rate`` there (``published_metric``), on ``eval/return_mean``
everywhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np
import pandas as pd

from dime_lightning.errors import ReferenceDataError

SOURCES = {"paper": "dime_paper_curves.csv"}
SOURCE_LABELS = {"paper": "DIME paper (Celik et al. 2025)"}
DMC_PREFIX = "dm_control/"
DMC_SPECIAL = {"acrobot-swingup": "dmc_acrobot", "finger-turn_hard": "dmc_finger_turn"}
DMC_NOTES = {"finger-turn_hard": "published folder 'dmc_finger_turn' does not say easy/hard; hard assumed"}
GYM_TASKS = {"Ant": "gym_ant_v3", "Humanoid": "gym_humanoid_v3"}
MYO_TASKS = {"myoHandKeyTurnRandom-v0": "myo_hand_key_turn_rndm", "myoHandObjHoldRandom-v0": "myo_hand_obj_hold_rndm",
             "myoHandPenTwirlRandom-v0": "myo_hand_pen_twirl_rndm", "myoHandReachRandom-v0": "myo_hand_reach_rndm"}
RETURN_METRIC = "eval/return_mean"
SUCCESS_METRIC = "eval/success_rate"  # the share of evaluation episodes that reached the task's success signal


@dataclass(frozen=True)
class ReferenceTask:
    """The published task that an env id is compared against."""

    env_id: str
    task: str
    source: str
    note: str  # "" when the published runs used the same env; else the mismatch, to be shown with the curve

    @property
    def label(self) -> str:
        """Legend and table label, with the note when there is one."""
        base = f"{SOURCE_LABELS[self.source]}: {self.task}"
        return f"{base} [{self.note}]" if self.note else base


def load_curves(source: str = "paper") -> pd.DataFrame:
    """The reference table of ``source`` (one row per task and evaluation point; columns as in the CSV).

    source: a key of ``SOURCES`` (only ``paper`` today)."""
    if source not in SOURCES:
        raise ReferenceDataError(f"unknown reference {source!r}; available: {sorted(SOURCES)}")
    return _read(source).copy()


@cache
def _read(source: str) -> pd.DataFrame:
    path = resources.files("dime_lightning") / "reference_data" / SOURCES[source]
    with path.open("r", encoding="utf-8") as handle:
        table = pd.read_csv(handle)
    return table.sort_values(["task", "env_steps"], kind="stable").reset_index(drop=True)


def reference_tasks(source: str = "paper") -> list[str]:
    """The task names of ``source``.

    source: a key of ``SOURCES``."""
    return sorted(load_curves(source).task.unique())


def published_metric(env_id: str) -> str:
    """The metric the published curves of ``env_id`` measure: ``eval/success_rate`` for the MyoSuite hand tasks
    (their published values are success rates), ``eval/return_mean`` for every other env id.

    env_id: a run's ``data.env_id`` (also as ``myosuite:<id>``)."""
    return SUCCESS_METRIC if env_id.rpartition(":")[2] in MYO_TASKS else RETURN_METRIC


def _candidate(env_id: str) -> tuple[str, str]:
    if env_id.rpartition(":")[2] in MYO_TASKS:
        return MYO_TASKS[env_id.rpartition(":")[2]], ""
    if env_id.startswith(DMC_PREFIX):
        name = env_id[len(DMC_PREFIX):]
        task = DMC_SPECIAL.get(name, "dmc_" + name.replace("-", "_"))
        return task, DMC_NOTES.get(name, "")
    match = re.fullmatch(r"(?:[\w.]+:)?(\w+)-v(\d+)", env_id)
    if match and match.group(1) in GYM_TASKS:
        version = match.group(2)
        note = "" if version == "3" else f"paper: Gym {match.group(1)}-v3 (gym 0.29, MuJoCo 2.3); this run: {env_id}"
        return GYM_TASKS[match.group(1)], note
    return "", ""


def reference_task(env_id: str, source: str = "paper") -> ReferenceTask:
    """The published task for ``env_id``; ``ReferenceDataError`` naming the env id and the known tasks if none.

    env_id: the run's ``data.env_id``, e.g. ``dm_control/dog-run`` or ``Ant-v5``.
    source: a key of ``SOURCES``."""
    task, note = _candidate(env_id)
    known = reference_tasks(source)
    if task not in known:
        raise ReferenceDataError(f"no {source!r} reference for env id {env_id!r}; reference tasks: {known}")
    return ReferenceTask(env_id, task, source, note)


def reference_seeds(task: str, source: str = "paper") -> tuple[np.ndarray, np.ndarray]:
    """Evaluation env steps (T,) and per-seed returns (T, seeds) of one published task.

    task: a name from ``reference_tasks`` (e.g. ``dmc_pendulum_swingup``).
    source: a key of ``SOURCES``."""
    table = load_curves(source)
    rows = table[table.task == task]
    if rows.empty:
        known = reference_tasks(source)
        raise ReferenceDataError(f"unknown {source!r} reference task {task!r}; reference tasks: {known}")
    seed_columns = [c for c in table.columns if c.startswith("seed") and c != "seeds"]
    return rows.env_steps.to_numpy(), rows[seed_columns].to_numpy(dtype=float)
