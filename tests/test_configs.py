"""The paper configs as families: every task resolves to the published settings it claims, task files hold only
what is their own, and the configs ship with the package (``--config conf/<name>.yaml`` from any folder)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dime_lightning import envs, reference, reproduce
from dime_lightning.configs import CONF_DIR, resolve_config_args, resolve_config_path
from dime_lightning.fit import build_cli

ROOT = Path(__file__).resolve().parents[1]
# The paper's shared settings (docs/algorithm.md §5), as dotted keys of the resolved config.
SHARED = {
    "seed_everything": 0, "model.actor.class_path": "dime_lightning.DiffusionActor",
    "model.actor.init_args.num_steps": 16, "model.actor.init_args.prior_std": 2.5,
    "model.actor.init_args.init_dt": 0.1, "model.actor.init_args.learn_dt": True,
    "model.actor.init_args.init_friction": 1.0, "model.actor.init_args.learn_friction": True,
    "model.actor.init_args.hidden_dim": 256, "model.actor.init_args.num_layers": 3,
    "model.actor.init_args.time_features": 256, "model.actor.init_args.time_hidden_dim": 256,
    "model.critic.class_path": "dime_lightning.DistributionalCritic",
    "model.critic.init_args.num_critics": 2, "model.critic.init_args.hidden_dims": [2048, 2048],
    "model.critic.init_args.num_atoms": 101, "model.critic.init_args.brn_momentum": 0.01,
    "model.critic.init_args.brn_eps": 0.001, "model.critic.init_args.brn_warmup_steps": 100_000,
    "model.temperature.init_args.init_alpha": 1.0, "model.temperature.init_args.mode": "auto",
    "model.temperature.init_args.target_per_dim": 4.0, "model.temperature.init_args.lr": 0.001,
    "model.update.gamma": 0.99, "model.update.utd": 2, "model.update.policy_delay": 3, "model.update.policy_tau": 1.0,
    "model.update.actor_lr": 0.0003, "model.update.critic_lr": 0.0003, "model.update.betas": [0.5, 0.999],
    "model.update.actor_grad_clip": 1.0, "model.update.critic_entropy_coef": 0.005, "data.learning_starts": 5000,
    "data.buffer_size": 1_000_000, "data.batch_size": 256, "eval.episodes": 5,
}
# Per family: value support (± v) and evaluation cadence; the env ids that belong to it.
FAMILIES = {"dmc": (200.0, 24_000, re.compile(r"dm_control/[a-z]+-[a-z_]+")),
            "gym_mujoco": (1600.0, 5_000, re.compile(r"(Ant|HalfCheetah|Hopper|Walker2d|Humanoid)-v5")),
            "myosuite": (200.0, 24_000, re.compile(r"myoHand(KeyTurn|ObjHold|PenTwirl|Reach)Random-v0"))}
PAPER_TASKS = sorted(p for p in CONF_DIR.glob("*.yaml")
                     if (yaml.safe_load(p.read_text()) or {}).get("config", "").startswith("base/"))


def resolved(capsys, *configs: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        build_cli([arg for path in configs for arg in ("--config", path)] + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def get(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def published_length(env_id: str) -> int:
    """The published runs' length, rounded up to whole millions (their last evaluation is at 984k or 3M)."""
    try:
        steps, _ = reference.reference_seeds(reference.reference_task(env_id).task)
    except reference.ReferenceDataError:  # HalfCheetah, Hopper, Walker2d: the paper's 1M
        return 1_000_000
    return math.ceil(steps[-1] / 1_000_000) * 1_000_000


def test_the_paper_tasks_are_the_twenty_four_of_three_families():
    names = {p.stem for p in PAPER_TASKS}
    assert len(names) == 24 and {"ant", "humanoid", "halfcheetah", "dmc_dog_run", "dmc_pendulum_swingup"} <= names
    assert {n for n in names if n.startswith("myo_")} == {f"myo_hand_{t}_random" for t in
                                                         ("key_turn", "obj_hold", "pen_twirl", "reach")}
    assert {p.stem for p in CONF_DIR.glob("dmc_*.yaml")} <= names  # every DMC config is a paper task


@pytest.mark.parametrize("path", PAPER_TASKS, ids=lambda p: p.stem)
def test_each_task_resolves_to_the_published_settings_it_claims(path, capsys):
    task_file = yaml.safe_load(path.read_text())
    family = Path(task_file["config"]).stem
    support, cadence, env_ids = FAMILIES[family]
    config = resolved(capsys, str(path))
    env_id = config["data"]["env_id"]
    assert env_ids.fullmatch(env_id), f"{path.name}: {env_id} is not a {family} env id"
    expected = {**SHARED, "model.critic.init_args.v_min": -support, "model.critic.init_args.v_max": support,
                "eval.every_env_steps": cadence, "data.total_env_steps": published_length(env_id)}
    wrong = {key: (get(config, key), value) for key, value in expected.items() if get(config, key) != value}
    assert not wrong, f"{path.name}: (resolved, published) {wrong}"
    # the task file holds only what is its own: the include, the env id and (where it differs) the run length
    assert set(task_file) == {"config", "data"} and set(task_file["data"]) <= {"env_id", "total_env_steps"}, path.name
    header = path.read_text().split("\nconfig:", 1)[0]
    length = "3M" if expected["data.total_env_steps"] == 3_000_000 else "1M"
    assert f"conf/base/{family}.yaml" in header and f"{length} env steps" in header  # what the comment claims


def test_a_family_setting_changes_every_task_of_the_family_and_only_those(tmp_path, capsys):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    dmc = conf / "base" / "dmc.yaml"
    dmc.write_text(dmc.read_text().replace("every_env_steps: 24000", "every_env_steps: 12000"))
    assert resolved(capsys, str(conf / "dmc_walker_run.yaml"))["eval"]["every_env_steps"] == 12_000
    assert resolved(capsys, str(conf / "dmc_dog_run.yaml"))["eval"]["every_env_steps"] == 12_000
    assert resolved(capsys, str(conf / "ant.yaml"))["eval"]["every_env_steps"] == 5_000


def test_print_config_shows_the_complete_resolved_config(capsys):
    config = resolved(capsys, "conf/dmc_cheetah_run.yaml")
    assert config["model"]["critic"]["init_args"]["hidden_dims"] == [2048, 2048]  # from base/paper.yaml
    assert config["model"]["critic"]["init_args"]["v_max"] == 200.0  # from base/dmc.yaml
    assert config["data"]["env_id"] == "dm_control/cheetah-run"  # from the task file


def test_conf_names_the_packaged_configs_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no conf/ here: the packaged one
    assert resolve_config_path("conf/ant.yaml") == str(CONF_DIR / "ant.yaml")
    assert resolve_config_args(["--config", "conf/ant.yaml", "--config=conf/smoke.yaml", "--seed_everything", "1"]) \
        == ["--config", str(CONF_DIR / "ant.yaml"), f"--config={CONF_DIR / 'smoke.yaml'}", "--seed_everything", "1"]
    assert resolved(capsys, "conf/ant.yaml", "conf/smoke.yaml")["data"]["env_id"] == "Ant-v5"
    assert resolve_config_path("conf/../../setup.py") == "conf/../../setup.py"  # nothing outside the package
    assert resolve_config_path("conf/nope.yaml") == "conf/nope.yaml"  # the parser's error names it
    assert resolve_config_args(["-c", "conf/ant.yaml"]) == ["-c", str(CONF_DIR / "ant.yaml")]
    assert reproduce.main(["--tasks", "conf/dmc_cheetah_run.yaml", "--overlay", "conf/smoke.yaml", "--seeds", "1",
                           "--dry_run", "--reference", "none", "--workdir", str(tmp_path / "runs")]) == 0
    command = capsys.readouterr().out
    assert f"--config {CONF_DIR / 'dmc_cheetah_run.yaml'} --config {CONF_DIR / 'smoke.yaml'}" in command
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "ant.yaml").write_text("config: mine.yaml\n")
    assert resolve_config_path("conf/ant.yaml") == "conf/ant.yaml"  # a file of the user's own comes first


def test_the_package_ships_every_config_and_the_checkout_links_to_them():
    setup = (ROOT / "setup.py").read_text()
    patterns = re.findall(r'"(conf/[^"]+)"', setup)
    shipped = {p for pattern in patterns for p in (ROOT / "dime_lightning").glob(pattern)}
    assert shipped == {p for p in CONF_DIR.rglob("*") if p.is_file()}, "setup.py package_data misses a config"
    assert (ROOT / "conf").is_symlink() and (ROOT / "conf").resolve() == CONF_DIR


@pytest.mark.parametrize("task", reproduce.resolve_tasks(["all"]), ids=lambda t: t.name)
def test_every_published_task_builds_its_env(task):
    needs = "myosuite" if envs.is_myosuite(task.env_id) else "dm_control" if task.env_id.startswith("dm_control/") \
        else None
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"needs {needs} (the {'myo' if needs == 'myosuite' else 'dmc'} extra)")
    spec = envs.env_spec(task.env_id)
    assert spec.obs_dim > 0 and spec.action_dim > 0


def test_a_wheel_trains_by_config_name_from_an_empty_folder(tmp_path):
    """pip wheel . → installed apart from the checkout → a smoke fit named by conf/<name> in an empty folder."""
    wheels, target, empty = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    had_build = (ROOT / "build").exists()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    if not had_build:  # setuptools' scratch folder in the checkout (git-ignored): leave the checkout as it was
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel, = wheels.glob("dime_lightning-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import dime_lightning; print(dime_lightning.__file__)"], cwd=empty,
                           capture_output=True, text=True, env=env, timeout=120)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr  # the wheel, not the checkout
    fit = subprocess.run([sys.executable, "-m", "dime_lightning.fit", "--config", "conf/pendulum.yaml", "--config",
                          "conf/smoke.yaml", "--data.total_env_steps", "150", "--trainer.enable_progress_bar", "false"],
                         cwd=empty, capture_output=True, text=True, env=env, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (empty / "mlflow.db").is_file() and list((empty / "checkpoints").glob("*/final.ckpt"))
