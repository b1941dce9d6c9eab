"""compare.py on a test MLflow database: one curve per group, and clear errors for unknown names."""

from __future__ import annotations

import mlflow
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
    curves, table, _ = compare.compare("Pendulum-v1", tracking_uri=tracking_uri, out=out)
    assert out.stat().st_size > 0
    by_label = {c.label: c for c in curves}
    assert set(by_label) == {"DIME", "Gaussian"}
    dime = by_label["DIME"]
    assert dime.runs == 2 and list(dime.steps) == [1000, 2000, 3000]
    assert list(dime.mean) == [-795.0, -295.0, -145.0] and list(dime.low) == [-800.0, -300.0, -150.0]
    assert table.loc["Gaussian", "final eval/return_mean"] == pytest.approx(-195.0)


def test_command_writes_the_png(tracking_uri, tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert compare.main(["--experiment", "Pendulum-v1", "--tracking-uri", tracking_uri, "--out", str(out),
                         "--group-by", "params.seed_everything"]) == 0
    assert out.stat().st_size > 0 and "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "Nope"], "unknown experiment 'Nope'"),
    (["--experiment", "Pendulum-v1", "--metric", "eval/nope"], "unknown metric 'eval/nope'"),
    (["--experiment", "Pendulum-v1", "--group-by", "params.nope"], "unknown --group-by 'params.nope'"),
])
def test_unknown_names_are_listed_with_what_exists(tracking_uri, tmp_path, capsys, args, message):
    assert compare.main([*args, "--tracking-uri", tracking_uri, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and ("Pendulum-v1" in err or "eval/return_mean" in err or "params.seed_everything" in err)
