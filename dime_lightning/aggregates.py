"""Aggregates the field reports (Agarwal et al. 2021): interquartile mean (IQM) with stratified-bootstrap 95 %
confidence intervals, computed with ``rliable`` (the authors' maintained implementation).

- ``iqm_ci(scores)``: IQM over the runs (seeds) of one task, with its CI.
- ``iqm_curve(values)``: the same at every evaluation point of a learning curve.
- ``aggregate_over_tasks(per_task)``: IQM over runs × tasks of score-normalised tasks (DMC returns / 1000),
  resampling runs within each task (rliable's stratified bootstrap); tasks may have different numbers of runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from dime_lightning.errors import BadInputError

DEFAULT_REPS = 5000
CONFIDENCE = 0.95
DMC_MAX_RETURN = 1000.0  # a DMC episode is 1,000 steps with rewards in [0, 1]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval."""

    point: float
    low: float
    high: float
    n: int  # runs (over all tasks for a cross-task aggregate)


def _estimates(scores: dict, func: Callable, reps: int, seed: int) -> tuple[dict, dict]:
    """rliable's get_interval_estimates, deterministic given ``seed``.

    rliable 1.2 draws its bootstrap indices from NumPy's global RNG (its ``random_state`` argument only reaches
    arch), so the global state is seeded here and restored afterwards; arch's FutureWarning about that
    argument is silenced."""
    from rliable import library

    saved = np.random.get_state()  # noqa: NPY002 (rliable reads the legacy global RNG)
    np.random.seed(seed)  # noqa: NPY002
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)
            return library.get_interval_estimates(scores, func, reps=reps, confidence_interval_size=CONFIDENCE,
                                                  random_state=np.random.RandomState(seed))
    finally:
        np.random.set_state(saved)  # noqa: NPY002


def _iqm(scores: np.ndarray) -> np.ndarray:
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(scores)])


def iqm_ci(scores: np.ndarray, reps: int = DEFAULT_REPS, seed: int = 0) -> Interval:
    """IQM of one task's runs and its 95 % stratified-bootstrap CI (a single run gives a zero-width interval).

    scores: (runs,) final values, one per seed.
    reps: bootstrap replications.
    seed: seed of the bootstrap's random state (the result is deterministic given it)."""
    values = np.asarray(scores, dtype=float).reshape(-1, 1)
    if values.shape[0] == 0:
        raise BadInputError("iqm_ci needs at least one score")
    if values.shape[0] == 1:
        return Interval(float(values[0, 0]), float(values[0, 0]), float(values[0, 0]), 1)
    points, intervals = _estimates({"x": values}, _iqm, reps, seed)
    return Interval(float(points["x"][0]), float(intervals["x"][0, 0]), float(intervals["x"][1, 0]),
                    values.shape[0])


def _iqm_per_point(scores: np.ndarray) -> np.ndarray:
    # rliable's aggregate_iqm (a 25 % trimmed mean over runs × tasks) at each evaluation point
    return stats.trim_mean(scores.reshape(-1, scores.shape[-1]), proportiontocut=0.25, axis=0)


def iqm_curve(values: np.ndarray, reps: int = DEFAULT_REPS, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQM over runs at every evaluation point, with the 95 % CI band: (iqm, low, high), each (T,).

    values: (T, runs) returns, one column per seed, on a common grid of evaluation points.
    reps: bootstrap replications.
    seed: seed of the bootstrap's random state."""
    table = np.asarray(values, dtype=float)
    if table.ndim != 2 or table.shape[1] == 0:
        raise BadInputError(f"iqm_curve needs a (T, runs) array, got shape {table.shape}")
    point = _iqm_per_point(table.T[:, None, :])
    if table.shape[1] == 1:
        return point, point.copy(), point.copy()
    _, intervals = _estimates({"x": table.T[:, None, :]}, _iqm_per_point, reps, seed)
    return point, intervals["x"][0], intervals["x"][1]


def normalise_dmc(returns: np.ndarray) -> np.ndarray:
    """DMC returns as scores in [0, 1] (return / 1000).

    returns: episode returns of DMC tasks."""
    return np.asarray(returns, dtype=float) / DMC_MAX_RETURN


def aggregate_over_tasks(per_task: dict[str, np.ndarray], reps: int = DEFAULT_REPS, seed: int = 0) -> Interval:
    """IQM over all runs of all tasks of normalised scores, with the 95 % CI of rliable's stratified bootstrap
    (runs resampled within each task).

    per_task: task name → (runs,) normalised final scores of that task.
    reps: bootstrap replications.
    seed: seed of the bootstrap's random state."""
    from rliable import metrics

    arrays = [np.asarray(v, dtype=float).reshape(-1) for v in per_task.values()]
    if not arrays or any(a.size == 0 for a in arrays):
        raise BadInputError("aggregate_over_tasks needs at least one score for every task")
    runs = sum(a.size for a in arrays)
    if all(a.size == 1 for a in arrays):
        # nothing to resample within a task: the IQM of the single runs, without an interval
        value = float(metrics.aggregate_iqm(np.concatenate(arrays)))
        return Interval(value, value, value, runs)

    def iqm_of_all(*scores: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(np.concatenate(scores))])

    points, intervals = _estimates({"x": arrays}, iqm_of_all, reps, seed)
    return Interval(float(points["x"][0]), float(intervals["x"][0, 0]), float(intervals["x"][1, 0]), runs)
