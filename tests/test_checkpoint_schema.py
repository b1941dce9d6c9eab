"""One owner per contract: the update settings (``update_settings``) and the checkpoint schema
(``checkpoint_schema``), with old checkpoints and old config keys."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fit_runs import CONF, run_fit

from dime_lightning import checkpoint_schema as schema
from dime_lightning import reproduce
from dime_lightning.analysis import load_policy
from dime_lightning.errors import EXIT_BAD_INPUT, BadInputError, CheckpointError
from dime_lightning.fit import build_cli
from dime_lightning.update_settings import NAMES, UpdateSettings

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LAYOUT1 = FIXTURES / "layout1_pendulum_tiny.ckpt"  # written by the code before the schema (60 env steps)
TINY = FIXTURES / "tiny_pendulum.yaml"


def test_the_settings_are_checked_once_with_their_config_key():
    assert UpdateSettings() == UpdateSettings.of(None) == UpdateSettings.of(UpdateSettings().as_dict())
    cases = {"gamma": 1.5, "utd": 0, "policy_delay": 0, "policy_tau": 0.0, "actor_lr": -1.0, "critic_lr": float("inf"),
             "betas": (0.5, 1.0), "actor_grad_clip": 0.0, "critic_entropy_coef": -0.1, "nonfinite": "ignore",
             "compile": "fast", "check_finite": "yes"}
    assert set(cases) == set(NAMES)
    for name, value in cases.items():
        with pytest.raises(BadInputError, match=f"model.update.{name} must be"):
            UpdateSettings(**{name: value})
    with pytest.raises(BadInputError, match=r"model\.update\.gamma must be a float in"):
        UpdateSettings.of({"gamma": "x"})  # a value of another type: the same error, not a TypeError
    with pytest.raises(BadInputError, match=r"unknown setting\(s\) \['lr'\]"):
        UpdateSettings.of({"lr": 1e-3})
    assert UpdateSettings(betas=[0.9, 0.99]).as_dict()["betas"] == [0.9, 0.99]  # plain data, a tuple inside


def test_the_module_exposes_the_settings_as_one_config_group(tmp_path, monkeypatch, capsys):
    args = ["--config", str(CONF / "pendulum.yaml"), "--model.update.utd", "4"]
    with pytest.raises(SystemExit):
        build_cli([*args, "--print_config"])
    assert "  update:\n    gamma: 0.99\n    utd: 4\n" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    cli = build_cli([*args, "--mlflow.enabled", "false"])
    assert cli.model.settings == UpdateSettings(utd=4)
    assert cli.datamodule.hparams.utd == 4  # linked into the data module
    assert cli.model.hparams["update"] == UpdateSettings(utd=4).as_dict()  # plain data for checkpoints


@pytest.mark.parametrize("where", ["command line", "config file"])
def test_an_old_key_is_refused_with_its_new_key_named(where, tmp_path, capsys):
    args = ["--config", str(CONF / "pendulum.yaml")]
    if where == "command line":
        args += ["--model.compile_update", "default"]
    else:
        old = tmp_path / "old.yaml"
        old.write_text("model:\n  gamma: 0.9\n")
        args += ["--config", str(old)]
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args)
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    if where == "command line":
        assert "model.compile_update (on the command line) is now model.update.compile" in err
    else:
        assert f"model.gamma (in {tmp_path / 'old.yaml'}) is now model.update.gamma" in err


def test_a_layout1_checkpoint_reads_as_the_current_layout():
    checkpoint = schema.read_checkpoint(LAYOUT1)
    assert checkpoint[schema.LAYOUT_KEY] == schema.LAYOUT
    hparams = checkpoint[schema.HPARAMS_KEY]
    assert UpdateSettings.of(hparams["update"]) == UpdateSettings(compile="none")  # that day's defaults
    assert not set(hparams) & {"gamma", "utd", "compile_update"}
    assert schema.config(checkpoint)["model"]["update"]["compile"] == "none"
    assert schema.counters(checkpoint) == schema.Counters(60, 40, 13, 0)
    assert schema.dims(checkpoint) == (3, 1)
    policy = load_policy(LAYOUT1)  # the notebooks' path
    assert policy.counters.env_steps == 60 and policy.config["model"]["update"]["utd"] == 2


def test_a_checkpoint_of_a_newer_layout_is_refused(tmp_path):
    checkpoint = torch.load(LAYOUT1, weights_only=False)
    checkpoint[schema.LAYOUT_KEY] = schema.LAYOUT + 1
    torch.save(checkpoint, tmp_path / "newer.ckpt")
    with pytest.raises(CheckpointError, match=f"layout {schema.LAYOUT + 1}, newer than this version reads"):
        schema.read_checkpoint(tmp_path / "newer.ckpt")


def test_a_layout1_checkpoint_resumes_and_is_written_back_in_the_current_layout(tmp_path):
    old = tmp_path / "old" / "layout1.ckpt"
    old.parent.mkdir()
    shutil.copy(LAYOUT1, old)
    result = run_fit(tmp_path, "--config", str(CONF / "pendulum.yaml"), "--config", str(TINY),
                     "--data.total_env_steps", "120", "--mlflow.enabled", "false", "--ckpt_path", str(old))
    assert result.returncode == 0, result.stderr[-3000:]
    final = schema.read_checkpoint(tmp_path / "ckpt" / "final.ckpt")
    # no buffer dump in the fixture: 40 env steps (learning_starts) refill the buffer, then 20 learning steps
    assert schema.counters(final) == schema.Counters(120, 80, 26, 0)
    raw = torch.load(tmp_path / "ckpt" / "final.ckpt", weights_only=False)
    assert raw[schema.LAYOUT_KEY] == schema.LAYOUT and raw[schema.HPARAMS_KEY]["update"]["utd"] == 2
    assert "env_steps" not in raw["ReplayDataModule"]  # the env steps are kept once, in the counters
    assert raw["ReplayDataModule"]["local_steps"] == 120


def test_reproduce_names_an_old_key_before_any_run_starts(tmp_path, capsys):
    assert reproduce.main(["--tasks", "pendulum", "--seeds", "1", "--dry_run", "--reference", "none",
                           "--workdir", str(tmp_path / "runs"), "--", "--model.utd", "3"]) == EXIT_BAD_INPUT
    assert "model.utd (on the command line) is now model.update.utd" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
