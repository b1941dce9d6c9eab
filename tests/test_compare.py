"""compare.py on a test MLflow database: one curve per group, and clear errors for unknown names."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from dime_lightning import compare

GROUPS = {"dime_lightning.actor.DiffusionActor": [-800.0, -300.0, -150.0],
          "dime_lightning.gaussian.TanhGaussianActor": [-900.0, -500.0, -200.0]}


@pytest.fixture
def tracking_uri(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("Pendulum-v1")
    for class_path, values in GROUPS.items():
        for seed in (0, 1):
            run = client.create_run(experiment)
            client.log_param(run.info.run_id, "model.actor.class_path", class_path)
            client.log_param(run.info.run_id, "seed_everything", str(seed))
            for step, value in zip((1000, 2000, 3000), values, strict=True):
                client.log_metric(run.info.run_id, "eval/return_mean", value + 10 * seed, step=step)
            client.set_terminated(run.info.run_id)
    return uri


def test_one_curve_per_group_with_mean_and_spread(tracking_uri, tmp_path):
    out = tmp_path / "curves.png"
    curves, table, _ = compare.compare("Pendulum-v1", tracking_uri=tracking_uri, out=out, reps=200)
    assert out.stat().st_size > 0
    by_label = {c.label: c for c in curves}
    assert set(by_label) == {"DIME", "Gaussian"}
    dime = by_label["DIME"]
    assert dime.runs == 2 and list(dime.steps) == [1000, 2000, 3000]
    assert list(dime.mean) == [-795.0, -295.0, -145.0] and list(dime.low) == [-800.0, -300.0, -150.0]
    assert table.loc["Gaussian", "final eval/return_mean"] == pytest.approx(-195.0)


def test_command_writes_the_png(tracking_uri, tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert compare.main(["--experiment", "Pendulum-v1", "--tracking_uri", tracking_uri, "--out", str(out),
                         "--group_by", "params.seed_everything", "--reps", "200"]) == 0
    assert out.stat().st_size > 0 and "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "Nope"], "unknown experiment 'Nope'"),
    (["--experiment", "Pendulum-v1", "--metric", "eval/nope"], "unknown metric 'eval/nope'"),
    (["--experiment", "Pendulum-v1", "--group_by", "params.nope"], "unknown --group_by 'params.nope'"),
])
def test_unknown_names_are_listed_with_what_exists(tracking_uri, tmp_path, capsys, args, message):
    assert compare.main([*args, "--tracking_uri", tracking_uri, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and ("Pendulum-v1" in err or "eval/return_mean" in err or "params.seed_everything" in err)


PAPER_72K = 815.4  # published dmc_pendulum_swingup mean at 72k env steps (10 seeds)


def _dmc_runs(uri: str, experiment: str, env_ids: dict[str, list[float]], seeds: int = 3) -> None:
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment(experiment)
    for env_id, values in env_ids.items():
        for seed in range(seeds):
            run = client.create_run(experiment_id)
            client.log_param(run.info.run_id, "model.actor.class_path", "dime_lightning.actor.DiffusionActor")
            client.log_param(run.info.run_id, "data.env_id", env_id)
            for step, value in zip((24_000, 48_000, 72_000), values, strict=True):
                client.log_metric(run.info.run_id, "eval/return_mean", value + 10 * seed, step=step)
            client.set_terminated(run.info.run_id)


def test_reference_paper_draws_both_curves_and_tabulates_iqm_and_ci(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'dmc.db'}"
    _dmc_runs(uri, "dm_control/pendulum-swingup", {"dm_control/pendulum-swingup": [10.0, 300.0, 700.0]})
    out, csv = tmp_path / "ref.png", tmp_path / "ref.csv"
    assert compare.main(["--experiment", "dm_control/pendulum-swingup", "--tracking_uri", uri, "--out", str(out),
                         "--reference", "paper", "--reps", "500", "--csv", str(csv)]) == 0
    assert out.stat().st_size > 0 and "IQM 95% CI low" in capsys.readouterr().out
    curves, table, fig = compare.compare("dm_control/pendulum-swingup", tracking_uri=uri,
                                         reference_source="paper", reps=500)
    ours, paper = curves[0], [c for c in fig.axes[0].get_lines() if "paper" in c.get_label()]
    assert ours.iqm[-1] == pytest.approx(710.0) and ours.iqm_low[-1] <= 710.0 <= ours.iqm_high[-1]
    assert len(fig.axes) == 2 and len(paper) == 1  # the published curve beside the runs, on both panels
    assert max(paper[0].get_xdata()) == 96_000  # drawn up to one published interval past the runs' last point
    rows = table.reset_index()
    published = rows[rows.group.str.contains("paper") & (rows["env steps"] == 72_000)].iloc[0]
    assert published["final eval/return_mean"] == pytest.approx(PAPER_72K) and published.runs == 10
    assert published["IQM 95% CI low"] <= published.IQM <= published["IQM 95% CI high"]
    assert (rows["env steps"] == 984_000).any()  # and at the published run's own last point
    assert table.loc["DIME", "IQM"] == pytest.approx(710.0)


def test_several_dmc_tasks_end_with_the_cross_task_aggregate(tmp_path):
    uri = f"sqlite:///{tmp_path / 'suite.db'}"
    _dmc_runs(uri, "suite", {"dm_control/pendulum-swingup": [10.0, 300.0, 700.0],
                             "dm_control/cheetah-run": [50.0, 150.0, 250.0]}, seeds=2)
    curves, table, fig = compare.compare("suite", tracking_uri=uri, reference_source="paper", reps=200)
    assert {c.task for c in curves} == {"dm_control/pendulum-swingup", "dm_control/cheetah-run"}
    assert len(fig.axes) == 6  # two tasks x (mean, IQM), then the cross-task aggregate
    aggregate = table.loc[compare.AGGREGATE]
    assert aggregate.loc["DIME", "runs"] == 4
    # final scores (return / 1000) 0.25, 0.26 (cheetah) and 0.70, 0.71 (pendulum): the IQM of 4 keeps the middle 2
    assert aggregate.loc["DIME", "IQM"] == pytest.approx(np.mean([0.26, 0.70]))
    paper = aggregate.loc[compare.reference.SOURCE_LABELS["paper"]]
    assert paper.runs == 20 and paper["IQM 95% CI low"] <= paper.IQM <= paper["IQM 95% CI high"]


def test_gym_v5_against_the_papers_v3_is_labelled(tmp_path):
    uri = f"sqlite:///{tmp_path / 'ant.db'}"
    _dmc_runs(uri, "Ant-v5", {"Ant-v5": [100.0, 500.0, 900.0]}, seeds=1)
    _, table, fig = compare.compare("Ant-v5", tracking_uri=uri, reference_source="paper", reps=100)
    notes = table.note.tolist()
    assert any("paper: Gym Ant-v3" in n and "Ant-v5" in n for n in notes)
    assert any("Ant-v3" in line.get_label() for line in fig.axes[0].get_lines())


def test_reference_for_a_task_without_published_curves_exits_2(tracking_uri, tmp_path, capsys):
    assert compare.main(["--experiment", "Pendulum-v1", "--tracking_uri", tracking_uri, "--reference", "paper",
                         "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no 'paper' reference for env id 'Pendulum-v1'" in err and "dmc_pendulum_swingup" in err
    assert not (tmp_path / "x.png").exists()
