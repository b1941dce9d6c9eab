"""Reference data shipped with the package, the env-id mapping of every DMC config, and the aggregates (IQM,
stratified-bootstrap CIs) against values computed independently here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml

from dime_lightning import aggregates, reference

CONF = Path(__file__).resolve().parents[1] / "conf"
DMC_CONFIGS = sorted(CONF.glob("dmc_*.yaml"))
PUBLISHED_DMC = {"dog-run", "dog-trot", "dog-walk", "dog-stand", "humanoid-run", "humanoid-walk", "humanoid-stand",
                 "acrobot-swingup", "cheetah-run", "finger-turn_hard", "fish-swim", "hopper-hop", "pendulum-swingup",
                 "quadruped-run", "walker-run"}


def test_known_values_of_the_csv_come_back_through_the_loader():
    steps, seeds = reference.reference_seeds("dmc_pendulum_swingup")
    assert seeds.shape == (42, 10) and steps[0] == 1 and steps[1] == 24_000 and steps[-1] == 984_000
    at_72k = seeds[list(steps).index(72_000)]
    assert at_72k[0] == pytest.approx(842.2) and at_72k.mean() == pytest.approx(815.4)
    assert at_72k.std(ddof=1) == pytest.approx(51.25, abs=0.01)  # the CSV's sd column (ddof 1)
    dog_steps, dog = reference.reference_seeds("dmc_dog_run")
    assert dog_steps[-1] == 3_000_000 and dog[-1].mean() == pytest.approx(814.36, abs=0.01)
    table = reference.load_curves("paper")
    assert set(table.task) >= {"gym_ant_v3", "gym_humanoid_v3", "dmc_finger_turn"} and table.task.nunique() == 21


def test_unknown_source_task_and_env_id_name_the_problem():
    with pytest.raises(reference.ReferenceDataError, match="unknown reference 'nope'; available: \\['paper'\\]"):
        reference.load_curves("nope")
    with pytest.raises(reference.ReferenceDataError, match="unknown 'paper' reference task 'dmc_nope'"):
        reference.reference_seeds("dmc_nope")
    with pytest.raises(reference.ReferenceDataError, match=r"no 'paper' reference for env id 'Pendulum-v1'.*dmc_dog"):
        reference.reference_task("Pendulum-v1")


def test_every_shipped_dmc_config_maps_to_a_reference_task():
    env_ids = {yaml.safe_load(p.read_text())["data"]["env_id"] for p in DMC_CONFIGS}
    assert {e.removeprefix("dm_control/") for e in env_ids} == PUBLISHED_DMC
    tasks = {reference.reference_task(e).task for e in env_ids}
    assert len(tasks) == 15 and "dmc_acrobot" in tasks and "dmc_finger_turn" in tasks
    assert reference.reference_task("dm_control/finger-turn_hard").note  # the easy/hard assumption is labelled
    assert reference.reference_task("dm_control/cheetah-run").note == ""
    # their resolved settings against the published ones: tests/test_configs.py


@pytest.mark.skipif(importlib.util.find_spec("dm_control") is None, reason="needs the dmc extra")
def test_every_dmc_config_names_a_dm_control_suite_task():
    from dm_control import suite

    for path in DMC_CONFIGS:
        domain, _, task = yaml.safe_load(path.read_text())["data"]["env_id"].removeprefix("dm_control/").partition("-")
        assert (domain, task) in suite.ALL_TASKS, path.name


def test_gym_v5_maps_to_the_papers_v3_with_the_mismatch_labelled():
    ant = reference.reference_task("Ant-v5")
    assert ant.task == "gym_ant_v3" and "Ant-v3" in ant.note and "Ant-v5" in ant.note and ant.note in ant.label
    assert reference.reference_task("Humanoid-v3").note == ""


def _independent_percentile_ci(values: np.ndarray, reps: int, rng: np.random.Generator) -> tuple[float, float]:
    samples = values[rng.integers(0, len(values), size=(reps, len(values)))]
    ordered = np.sort(samples, axis=1)
    cut = len(values) // 4
    iqms = ordered[:, cut:len(values) - cut].mean(axis=1)
    return tuple(np.percentile(iqms, [2.5, 97.5]))


def test_iqm_and_ci_of_a_fixed_sample():
    sample = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 100.0])  # IQM drops 2 each end: mean(2..7)
    interval = aggregates.iqm_ci(sample, reps=20_000)
    assert interval.point == pytest.approx(4.5) and interval.n == 10
    low, high = _independent_percentile_ci(sample, 20_000, np.random.default_rng(1))
    grid = 1.0 / 6.0  # a resampled IQM is a mean of 6 integers here: percentiles may differ by one grid step
    assert interval.low == pytest.approx(low, abs=grid + 1e-9) and interval.high == pytest.approx(high, abs=grid + 1e-9)
    assert interval.low < 4.5 < interval.high
    assert aggregates.iqm_ci(sample, reps=20_000) == interval  # deterministic given the seed
    assert aggregates.iqm_ci([3.0]) == aggregates.Interval(3.0, 3.0, 3.0, 1)


def test_iqm_curve_per_point_and_aggregate_over_tasks():
    values = np.array([[0.0, 1.0, 2.0, 3.0], [10.0, 20.0, 30.0, 1000.0]])  # (T=2, runs=4)
    iqm, low, high = aggregates.iqm_curve(values, reps=2000)
    assert iqm == pytest.approx([1.5, 25.0])  # middle two of four runs
    assert (low <= iqm).all() and (iqm <= high).all() and low[0] >= 0.0 and high[0] <= 3.0  # within the range
    a = aggregates.normalise_dmc([100.0, 200.0, 300.0, 400.0])
    b = aggregates.normalise_dmc([900.0, 950.0, 1000.0, 0.0])
    combined = aggregates.aggregate_over_tasks({"a": a, "b": b}, reps=2000)
    assert combined.point == pytest.approx(np.sort(np.concatenate([a, b]))[2:6].mean()) and combined.n == 8
    assert combined.low <= combined.point <= combined.high
