"""Evaluation videos: an MP4 artifact from a smoke fit through the real CLI, start-up refusals, and the cadence."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import mlflow
import numpy as np
import pytest

from dime_lightning import video
from dime_lightning.callbacks import Evaluation
from dime_lightning.fit import EXIT_BAD_INPUT, build_cli
from dime_lightning.video import EpisodeRecorder, records_video, video_name

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
HAS_DMC = importlib.util.find_spec("dm_control") is not None


def _child_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MUJOCO_GL", None)  # the fit picks the GL backend itself
    env.pop("PYOPENGL_PLATFORM", None)
    return env


def _decode(path: str | Path) -> list[np.ndarray]:
    return [frame for frame in imageio.get_reader(path, format="FFMPEG")]  # (its len() is inf: no list())


def test_smoke_fit_logs_a_decodable_mp4_artifact_at_the_cadence(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "dime_lightning.fit", "--config", str(CONF / "hopper.yaml"),
               "--config", str(CONF / "smoke.yaml"), "--eval.video", "true", "--eval.video_every", "2",
               "--eval.every_env_steps", "100",
               "--mlflow.tracking_uri", uri, "--checkpoint.dirpath", str(tmp_path / "ckpt"),
               "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["Hopper-v5"])
    assert len(runs) == 1 and runs.status[0] == "FINISHED"
    run_id = runs.run_id[0]
    # evaluations at 100, 200 and 300 env steps: video_every 2 records the 2nd, and the last one always records
    listed = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "videos")]
    assert listed == ["videos/env_step_000000200.mp4", "videos/env_step_000000300.mp4"]
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=listed[-1], dst_path=str(tmp_path / "dl"))
    assert Path(local).stat().st_size > 0
    frames = _decode(local)
    length = mlflow.MlflowClient().get_metric_history(run_id, "eval/episode_length")[-1].value
    assert len(frames) == int(length) + 1  # the state of every step, and the last one (smoke: 1 episode per eval)
    assert frames[0].shape == (480, 480, 3) and frames[0].dtype == np.uint8
    assert len({frame.tobytes() for frame in frames}) > 1  # the hopper moves
    meta = imageio.get_reader(local, format="FFMPEG").get_meta_data()
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert (tmp_path / "ckpt" / "videos" / "env_step_000000300.mp4").is_file()  # kept beside the checkpoints


def _refused(tmp_path, capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_cli([*args, "--config", str(CONF / "smoke.yaml"), "--eval.video", "true",
                   "--mlflow.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "--checkpoint.dirpath", str(tmp_path / "ckpt")])
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store (and training) is touched
    return capsys.readouterr().err


def test_a_toy_env_is_refused_at_start_up(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    err = _refused(tmp_path, capsys, "--config", str(CONF / "multigoal.yaml"))
    assert "eval.video" in err and "'MultiGoal-v0' has no MuJoCo scene" in err


def test_a_missing_codec_is_refused_at_start_up(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if imageio-ffmpeg were not installed
    err = _refused(tmp_path, capsys, "--config", str(CONF / "hopper.yaml"))
    assert "imageio-ffmpeg" in err and "pip install" in err


def test_no_gl_backend_is_refused_at_start_up(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.setattr(video, "_probe_gl", lambda backend: f"lib{backend} not found")
    err = _refused(tmp_path, capsys, "--config", str(CONF / "hopper.yaml"))
    assert "no headless OpenGL renderer" in err and "MUJOCO_GL=egl: libegl not found" in err
    assert "MUJOCO_GL" not in os.environ


def test_the_gl_backend_is_picked_when_unset_egl_first_then_osmesa(monkeypatch):
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    tried = []
    monkeypatch.setattr(video, "_probe_gl", lambda backend: tried.append(backend) or (
        "no EGL display" if backend == "egl" else None))
    assert video.choose_gl_backend() == "osmesa" and os.environ["MUJOCO_GL"] == "osmesa"
    assert tried == ["egl", "osmesa"]
    monkeypatch.setenv("MUJOCO_GL", "egl")  # a set MUJOCO_GL is kept (and probes nothing)
    assert video.choose_gl_backend() == "egl" and tried == ["egl", "osmesa"]


@pytest.mark.skipif(not HAS_DMC, reason="needs the dmc extra")
def test_a_dmc_env_renders_a_frame_headless():
    code = "from dime_lightning.video import check_video; check_video('dm_control/cheetah-run')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=_child_env())
    assert result.returncode == 0, result.stderr[-3000:]


def test_video_every_counts_evaluations_in_env_steps():
    every = 150
    periodic = [s for s in (150, 300, 450, 600, 750, 900) if records_video(s, every, 3, final=False)]
    assert periodic == [450, 900]  # evaluations 3 and 6
    assert records_video(301, every, 2, final=False)  # a collector batch that overshoots still counts as the 2nd
    assert records_video(310, every, 3, final=True)  # the evaluation that ends training always records
    assert all(records_video(s, every, 1, final=False) for s in (150, 300, 450))
    with pytest.raises(ValueError, match=r"eval\.video_every must be >= 1"):
        Evaluation(video=True, video_every=0)
    assert video_name(12_000) == "env_step_000012000.mp4"


def test_recorder_streams_frames_and_a_failed_render_loses_only_the_video(tmp_path, monkeypatch):
    frames = [np.full((32, 48, 3), value, dtype=np.uint8) for value in (0, 128, 255)]
    source = iter(frames)
    monkeypatch.setattr(video, "frame_source", lambda env, env_id: video.FrameSource(lambda: next(source)))
    monkeypatch.setattr(video, "frames_per_second", lambda env, env_id: 10.0)
    recorder = EpisodeRecorder(None, "Hopper-v5", tmp_path / "videos" / "a.mp4")
    for _ in frames:
        recorder.capture()
    path = recorder.close()
    decoded = _decode(path)
    assert path == tmp_path / "videos" / "a.mp4" and len(decoded) == 3 and decoded[0].shape == (32, 48, 3)
    assert abs(float(decoded[2].mean()) - 255) < 8 and recorder.error is None

    def broken() -> np.ndarray:
        raise RuntimeError("GL context lost")

    monkeypatch.setattr(video, "frame_source", lambda env, env_id: video.FrameSource(broken))
    failed = EpisodeRecorder(None, "Hopper-v5", tmp_path / "videos" / "b.mp4")
    failed.capture()
    failed.capture()
    assert failed.close() is None and "RuntimeError: GL context lost" in failed.error
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["a.mp4"]  # no partial file left
