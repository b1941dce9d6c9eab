"""MyoSuite: the four hand tasks through envs.py (with the myo extra), the success signal from env to
``eval/success_rate`` (on a stand-in env, so that it is tested without MyoSuite too), the published metric per
task in compare and reproduce."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gymnasium
import mlflow
import numpy as np
import pytest
import torch

from dime_lightning import compare, envs, reference, reproduce
from dime_lightning.callbacks import Evaluation

HAS_MYO = importlib.util.find_spec("myosuite") is not None
CONF = Path(__file__).resolve().parents[1] / "conf"
HAND_TASKS = {"myoHandKeyTurnRandom-v0": (93, 200), "myoHandObjHoldRandom-v0": (91, 75),
              "myoHandPenTwirlRandom-v0": (83, 50), "myoHandReachRandom-v0": (115, 100)}
STAND_IN = "myoStandInSolved-v0"  # a myo-prefixed id served by SolvedEveryOtherEpisode (no MyoSuite needed)


class SolvedEveryOtherEpisode(gymnasium.Env):
    """Five steps per episode; ``solved`` (an int, as MyoSuite's pen task reports it) at the last step of every
    other episode and at step 3 (only) of the others: each reset toggles which (whichever resets TorchRL makes
    while building, every other episode ends solved)."""

    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self) -> None:
        self.solving, self.t = False, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.solving, self.t = not self.solving, 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        solved = int(self.t == (5 if self.solving else 3))
        return np.zeros(2, np.float32), 0.0, False, self.t >= 5, {"solved": solved, "rwd_dict": {}}


@pytest.fixture
def stand_in(monkeypatch):
    if STAND_IN not in gymnasium.registry:
        gymnasium.register(STAND_IN, entry_point=SolvedEveryOtherEpisode)
    monkeypatch.setattr(envs, "_import_myosuite", lambda env_id: None)  # the id is registered above
    return STAND_IN


def test_the_success_flag_reaches_the_evaluation_env_only(stand_in):
    evaluation_env = envs.make_env(stand_in, seed=0, success=True)
    flags = [evaluation_env.rollout(5)["next", "success"] for _ in range(2)]  # two episodes: one ends solved
    assert flags[0].dtype == torch.bool and flags[0].shape == (5,)
    assert sorted(f.tolist() for f in flags) == [[False, False, False, False, True], [False, False, True, False, False]]
    assert evaluation_env.observation_spec["observation"].shape == (2,)  # success is not part of the observation
    assert "success" not in envs.make_env(stand_in, seed=0).rollout(5)["next"].keys()  # training env: none


def test_evaluation_logs_the_share_of_episodes_that_end_solved(stand_in):
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((metrics, step)))
    data = SimpleNamespace(hparams=SimpleNamespace(env_id=stand_in, seed=0, total_env_steps=1000))
    trainer = SimpleNamespace(global_rank=0, loggers=[logger], callback_metrics={}, datamodule=data, callbacks=[])
    actor = SimpleNamespace(act=lambda obs: torch.zeros(*obs.shape[:-1], 1))
    module = SimpleNamespace(env_steps=100, device=torch.device("cpu"), actor=actor)
    Evaluation(every_env_steps=100, episodes=4).evaluate(trainer, module)
    (metrics, step), = logged
    assert step == 100 and metrics["eval/success_rate"] == 0.5 and metrics["eval/episode_length"] == 5.0
    # (solved only in the middle of an episode does not count: every episode reported it once)


def test_myo_ids_without_the_extra_name_it():
    if HAS_MYO:
        pytest.skip("myosuite is installed (the myo extra): this checks the message without it")
    with pytest.raises(envs.EnvIdError, match=r"MyoSuite task and needs myosuite.*dime-lightning\[myo\]"):
        envs.check_env_id("myoHandReachRandom-v0")
    with pytest.raises(reproduce.ReproduceError, match=r"myo_hand_reach_random.*dime-lightning\[myo\]"):
        reproduce.check_tasks(reproduce.resolve_tasks(["myo_hand_reach_random"]), "paper")


@pytest.mark.skipif(not HAS_MYO, reason="needs the myo extra (pip install -e '.[dev,dmc,myo]')")
@pytest.mark.parametrize("env_id", sorted(HAND_TASKS))
def test_hand_tasks_build_with_their_dimensions_limits_and_success(env_id):
    obs_dim, limit = HAND_TASKS[env_id]
    assert envs.env_spec(env_id) == envs.EnvSpec(env_id, obs_dim, 39)
    env = envs.make_env(env_id, seed=0, success=True)
    assert torch.equal(env.action_spec.space.low, -torch.ones(39)) and torch.equal(env.action_spec.space.high,
                                                                                   torch.ones(39))
    rollout = env.rollout(limit + 10, break_when_any_done=True)
    assert rollout.shape[0] <= limit and rollout["next", "success"].dtype == torch.bool
    assert rollout["observation"].shape[-1] == obs_dim and torch.isfinite(rollout["next", "observation"]).all()
    if rollout.shape[0] == limit:  # ran to the time limit: truncated, not terminated
        assert rollout["next", "truncated"][-1].item() and not rollout["next", "terminated"][-1].item()
    first = envs.make_env(env_id, seed=3).reset()["observation"]
    assert torch.equal(first, envs.make_env(env_id, seed=3).reset()["observation"])  # seeded
    env.close()


@pytest.mark.skipif(not HAS_MYO, reason="needs the myo extra (pip install -e '.[dev,dmc,myo]')")
def test_a_hand_task_renders_for_evaluation_videos(monkeypatch):
    from dime_lightning import video

    monkeypatch.setenv("MUJOCO_GL", "egl")
    video.check_video("myoHandReachRandom-v0")  # GL, codec and one frame from the hand_top camera, or VideoError
    env = envs.make_env("myoHandReachRandom-v0", seed=0)
    render = video.frame_source(env, "myoHandReachRandom-v0")
    try:
        frame = render()
        assert frame.shape == (video.FRAME_SIZE, video.FRAME_SIZE, 3) and frame.max() > 50  # not a blank frame
    finally:
        render.close()
        env.close()


def test_the_hand_tasks_are_compared_on_success_rates():
    for env_id, task in reference.MYO_TASKS.items():
        assert reference.reference_task(env_id).task == task and reference.reference_task(f"myosuite:{env_id}")
        assert reference.published_metric(env_id) == "eval/success_rate"
    assert reference.published_metric("dm_control/cheetah-run") == reference.published_metric("Ant-v5") \
        == "eval/return_mean"
    assert {t.env_id for t in reproduce.resolve_tasks(["myo_hand_key_turn_random", "myoHandReachRandom-v0"])} \
        == {"myoHandKeyTurnRandom-v0", "myoHandReachRandom-v0"}


def test_compare_reads_each_task_on_its_published_metric(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mixed.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("mixed")
    for env_id, metric, values in (("myoHandReachRandom-v0", "eval/success_rate", [0.2, 0.6, 0.8]),
                                   ("dm_control/cheetah-run", "eval/return_mean", [80.0, 300.0, 450.0])):
        run = client.create_run(experiment_id)
        client.log_param(run.info.run_id, "model.actor.class_path", "dime_lightning.actor.DiffusionActor")
        client.log_param(run.info.run_id, "data.env_id", env_id)
        for step, value in zip((24_000, 48_000, 72_000), values, strict=True):
            client.log_metric(run.info.run_id, metric, value, step=step)
            client.log_metric(run.info.run_id, "eval/return_mean" if metric != "eval/return_mean" else "other",
                              -1000.0, step=step)  # the other metric must not be the one read
        client.set_terminated(run.info.run_id)
    curves, table, fig = compare.compare("mixed", tracking_uri=uri, reference_source="paper", reps=100)
    finals = {c.task: float(c.mean[-1]) for c in curves}
    assert finals == {"myoHandReachRandom-v0": 0.8, "dm_control/cheetah-run": 450.0}
    assert "final score" in table.columns  # two metrics in one table
    labels = {ax.get_ylabel() for ax in fig.axes}
    assert {"eval/success_rate", "eval/return_mean"} <= labels
    rows = table.reset_index()
    published = rows[(rows.task == "myoHandReachRandom-v0") & rows.group.str.contains("paper")]
    assert len(published) and (published["final score"] <= 1.0).all()  # the published success rates, not returns
    with pytest.raises(compare.CompareError, match=r"--metric eval/return_mean cannot be compared with the published "
                                                   r"curves of \['myoHandReachRandom-v0'\].*eval/success_rate"):
        compare.compare("mixed", metric="eval/return_mean", tracking_uri=uri, reference_source="paper", reps=100)


@pytest.mark.skipif(not HAS_MYO, reason="needs the myo extra (pip install -e '.[dev,dmc,myo]')")
def test_a_smoke_fit_on_a_hand_task_logs_success_and_compares_with_the_published_rates(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "dime_lightning.fit", "--config", str(CONF / "myo_hand_reach_random.yaml"),
               "--config", str(CONF / "smoke.yaml"), "--mlflow.tracking_uri", uri, "--checkpoint.dirpath",
               str(tmp_path / "ckpt"), "--trainer.enable_progress_bar", "false"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("myoHandReachRandom-v0").experiment_id])[0]
    assert run.info.status == "FINISHED"
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "eval/success_rate")]
    assert len(rates) == 2 and all(0.0 <= r <= 1.0 for r in rates)  # evaluations at 150 and 300 env steps
    out = tmp_path / "compare.png"
    assert compare.main(["--experiment", "myoHandReachRandom-v0", "--tracking_uri", uri, "--reference", "paper",
                         "--reps", "200", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "final eval/success_rate" in table and "myo_hand_reach_rndm" in table and "IQM 95% CI low" in table
    assert out.stat().st_size > 0
