"""The fit entry point: configs parse, a smoke fit through the real CLI, and bad input fails fast."""

from __future__ import annotations

import importlib.util

import mlflow
import pytest
import torch
import yaml
from fit_runs import CONF, run_fit

from dime_lightning import fit
from dime_lightning.errors import EXIT_BAD_INPUT
from dime_lightning.fit import build_cli

OVERLAYS = {"smoke.yaml", "gaussian.yaml"}
TASK_CONFIGS = sorted(p for p in CONF.glob("*.yaml") if p.name not in OVERLAYS)
PAPER_CONFIGS = {"halfcheetah", "hopper", "walker2d", "ant", "humanoid", "dmc_humanoid_run", "dmc_dog_run"}
HAS_DMC = importlib.util.find_spec("dm_control") is not None


@pytest.mark.parametrize("config", TASK_CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", str(config), "--config", str(CONF / "smoke.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["env_id"]
    critic = resolved["model"]["critic"]["init_args"]
    expected = 200.0 if resolved["data"]["env_id"].startswith("dm_control/") else 1600.0
    if config.stem in PAPER_CONFIGS:
        assert (critic["v_min"], critic["v_max"]) == (-expected, expected)
        assert yaml.safe_load(config.read_text())["config"].startswith("base/")  # paper sizes from its family
    assert "obs_dim" not in (yaml.safe_load(config.read_text()).get("model") or {})  # dimensions come from the env


def test_gaussian_overlay_switches_only_the_actor(capsys):
    with pytest.raises(SystemExit):
        build_cli(["--config", str(CONF / "pendulum.yaml"), "--config", str(CONF / "smoke.yaml"),
                   "--config", str(CONF / "gaussian.yaml"), "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["actor"]["class_path"].endswith("TanhGaussianActor")
    assert "num_steps" not in model["actor"]["init_args"]
    assert model["temperature"]["init_args"]["target_per_dim"] == 1.0
    assert model["critic"]["init_args"]["hidden_dims"] == [32, 32]  # the rest is unchanged


def test_pendulum_smoke_fit_through_the_real_cli(tmp_path):
    result = run_fit(tmp_path, "--config", str(CONF / "pendulum.yaml"), "--config", str(CONF / "smoke.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["Pendulum-v1"])
    assert len(runs) == 1 and runs.status[0] == "FINISHED"
    client = mlflow.MlflowClient()
    run_id = runs.run_id[0]
    run = client.get_run(run_id)  # a default name and tags to tell runs apart by
    assert run.info.run_name == "Pendulum-v1-DIME-seed0"
    keys = ("dime.task", "dime.actor", "dime.seed", "dime.compile", "dime.compile_act", "dime.storage")
    assert {key: run.data.tags.get(key) for key in keys} == {  # the speed settings' "auto", as resolved: a short
        "dime.task": "Pendulum-v1", "dime.actor": "DIME", "dime.seed": "0",  # CPU run stays eager (auto.py)
        "dime.compile": "none", "dime.compile_act": "none", "dime.storage": "memory"}
    # 100 -> 200 holds the evaluation and checkpoint at 150: the training rate leaves their time out, the wall rate not
    rates = {key: {m.step: m.value for m in client.get_metric_history(run_id, f"time/{key}")}
             for key in ("env_steps_per_second", "env_steps_per_second_wall")}
    assert sorted(rates["env_steps_per_second"]) == [100, 200, 300]
    assert rates["env_steps_per_second"][200] > rates["env_steps_per_second_wall"][200]
    eval_steps = [m.step for m in client.get_metric_history(run_id, "eval/return_mean")]
    assert eval_steps == [150, 300]  # x-axis = env steps (eval every 150 in smoke.yaml)
    loss_steps = [m.step for m in client.get_metric_history(run_id, "train/loss_critic")]
    assert loss_steps and min(loss_steps) > 100 and max(loss_steps) <= 300  # after learning_starts, in env steps
    assert client.get_metric_history(run_id, "train/episode_return")
    for key in ("train/q_mean", "train/policy_q_mean"):  # the critic's and the actor's Q, both logged
        assert client.get_metric_history(run_id, key), key
    params = client.get_run(run_id).data.params
    assert params["data.env_id"] == "Pendulum-v1" and params["model.update.utd"] == "2" and "version.torch" in params
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert {"config.yaml", "checkpoints/final.ckpt"} <= artifacts
    assert "checkpoints/last.ckpt" not in artifacts  # the same file as final.ckpt: logged once
    # the reference schedule: 2 critic updates per learning env step, an actor update every 3rd
    checkpoint = torch.load(tmp_path / "ckpt" / "final.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["dime_counters"] == {"env_steps": 300, "critic_updates": 400, "actor_updates": 133,
                                           "skipped_updates": 0}
    assert checkpoint["hyper_parameters"]["obs_dim"] == 3


def test_ant_paper_config_runs_end_to_end_with_smoke_overlay(tmp_path):
    result = run_fit(tmp_path, "--config", str(CONF / "ant.yaml"), "--config", str(CONF / "smoke.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "ckpt" / "final.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["hyper_parameters"]["obs_dim"] == 105 and checkpoint["hyper_parameters"]["action_dim"] == 8


BASE = ["--config", str(CONF / "pendulum.yaml"), "--config", str(CONF / "smoke.yaml")]
BAD_INPUTS = {
    "wrong type": (["--data.batch_size", "abc"], "batch_size"),
    "v_min >= v_max": (["--model.critic.v_min", "10", "--model.critic.v_max", "5"], "v_min"),
    "num_steps < 1": (["--model.actor.num_steps", "0"], "num_steps"),
    "batch_size < 1": (["--data.batch_size", "0"], "batch_size"),
    "utd < 1": (["--model.update.utd", "0"], "utd"),
    "negative learning rate": (["--model.update.actor_lr", "-0.001"], "actor_lr"),
    "negative temperature lr": (["--model.temperature.lr", "-1"], "lr"),
    "total < learning_starts": (["--data.total_env_steps", "50"], "total_env_steps"),
    "unknown env id": (["--data.env_id", "NoSuchEnv-v3"], "unknown env id 'NoSuchEnv-v3'"),
    "unknown nested key": (["--model.actor.num_stepz", "3"], "num_stepz"),
    "16-mixed precision": (["--trainer.precision", "16-mixed"], "use 32-true or bf16-mixed"),
    "bf16-true precision": (["--trainer.precision", "bf16-true"], "'bf16-true' is not supported"),
    "unsupported strategy": (["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"], "'ddp_spawn' is not"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_fails_fast_with_a_clear_message(case, tmp_path, monkeypatch, capsys):
    extra, message = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        build_cli([*BASE, *extra])
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_a_bug_is_not_reported_as_bad_input(tmp_path, monkeypatch, capsys):
    def broken(strategy):
        raise TypeError("unsupported operand type(s)")  # as a bug in the package would

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fit, "resolve_strategy", broken)
    with pytest.raises(TypeError, match="unsupported operand"):  # its traceback, not "error: ..." and exit 2
        build_cli(BASE)
    assert "dime_lightning.fit: error" not in capsys.readouterr().err


def test_unknown_key_in_a_config_file_names_key_and_file(tmp_path, monkeypatch, capsys):
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("data:\n  learning_startz: 10\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        build_cli([*BASE, "--config", str(overlay)])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "learning_startz" in err and "typo.yaml" in err


def test_missing_config_file_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", "conf/does_not_exist.yaml"])
    assert exit_info.value.code not in (0, None)
    assert "does_not_exist.yaml" in capsys.readouterr().err


@pytest.mark.skipif(HAS_DMC, reason="dm_control is installed")
def test_dmc_without_dm_control_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", str(CONF / "dmc_dog_run.yaml"), "--config", str(CONF / "smoke.yaml")])
    assert exit_info.value.code not in (0, None)
    assert "pip install 'dime-lightning[dmc]'" in capsys.readouterr().err


def test_the_training_rate_leaves_out_the_time_of_evaluations_and_checkpoints(monkeypatch):
    from types import SimpleNamespace

    from dime_lightning import callbacks

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock.now)
    monitor, evaluation = callbacks.TrainingMonitor(every_env_steps=100), SimpleNamespace(paused_seconds=0.0)
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(callbacks=[monitor, evaluation], loggers=[logger], callback_metrics={},
                              datamodule=SimpleNamespace(pop_finished_episodes=list))
    module = SimpleNamespace(env_steps=0)
    monitor.on_train_start(trainer, module)
    for seconds, paused in ((1.0, 0.0), (11.0, 10.0)):  # 100 env steps in 1 s; then again, plus a 10 s evaluation
        clock.now += seconds
        evaluation.paused_seconds += paused
        module.env_steps += 100
        monitor.on_train_batch_end(trainer, module, None, None, 0)
    assert [step for step, _ in logged] == [100, 200]
    assert [m["time/env_steps_per_second"] for _, m in logged] == [100.0, 100.0]  # does not fall at the evaluation
    assert [round(m["time/env_steps_per_second_wall"], 3) for _, m in logged] == [100.0, 9.091]
    assert logged[-1][1]["time/elapsed_seconds"] == 12.0
