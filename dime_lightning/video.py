"""Evaluation videos: frames of one episode streamed into an H.264 MP4, and the start-up checks for it.

Videos are made of MuJoCo scenes, rendered off-screen (no display needed) at 480×480: Gymnasium MuJoCo envs
(e.g. ``HalfCheetah-v5``, from the model's ``track`` camera, which follows the body, through Gymnasium's
``OffScreenViewer``), MyoSuite envs (the same viewer, from the hand models' ``hand_top`` camera) and DeepMind
Control Suite envs (``dm_control/<domain>-<task>``, ``physics.render`` of
camera 0). Other envs (the toy tasks, ``Pendulum-v1``, …) are refused at start-up with a message that says so.

The OpenGL backend comes from ``MUJOCO_GL``; when it is unset, ``choose_gl_backend`` tries ``egl``, then
``osmesa`` (each in a short child process, since a failed backend cannot be swapped out inside one process)
and sets the first that opens a context. It must run before dm_control is imported: dm_control reads
``MUJOCO_GL`` once, on import. Files are written with imageio's FFmpeg plugin (``imageio-ffmpeg`` ships the
ffmpeg binary): H.264 in yuv420p with the index at the front (``+faststart``), which browsers play.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dime_lightning.envs import DMC_PREFIX, make_env
from dime_lightning.errors import VideoError

GL_BACKENDS = ("egl", "osmesa")
FRAME_SIZE = 480  # pixels, height and width of every frame
INSTALL_HINT = "pip install 'dime-lightning[video]' (imageio and imageio-ffmpeg)"
_GL_PROBE = "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()"


def video_name(env_steps: int) -> str:
    """The file (and artifact) name of the video recorded at ``env_steps``: ``env_step_000012000.mp4``."""
    return f"env_step_{env_steps:09d}.mp4"


def records_video(env_steps: int, every_env_steps: int, video_every: int, final: bool) -> bool:
    """Whether the evaluation at ``env_steps`` records a video: the periodic evaluation number
    n = env_steps // every_env_steps records when n is a multiple of ``video_every``; the evaluation at the
    end of training (``final``) always records. Counted in env steps, so a resumed run keeps the cadence."""
    return final or (env_steps // every_env_steps) % video_every == 0


def _probe_gl(backend: str) -> str | None:
    """None if a child process opens a ``backend`` GL context, else the last line of what it said."""
    env = {**os.environ, "MUJOCO_GL": backend}
    env.pop("PYOPENGL_PLATFORM", None)  # mujoco sets it to match MUJOCO_GL
    try:
        done = subprocess.run([sys.executable, "-c", _GL_PROBE], env=env, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return "timed out after 120 s"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {done.returncode}"


def choose_gl_backend() -> str:
    """``MUJOCO_GL`` if set; else the first of egl, osmesa that opens a context, which is then set."""
    if os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"]
    failures = {}
    for backend in GL_BACKENDS:
        failure = _probe_gl(backend)
        if failure is None:
            os.environ["MUJOCO_GL"] = backend
            return backend
        failures[backend] = failure
    tried = "; ".join(f"MUJOCO_GL={name}: {why}" for name, why in failures.items())
    raise VideoError(f"eval.video: no headless OpenGL renderer for MuJoCo ({tried}). Install EGL (libegl1, with a "
                     "GPU driver or Mesa) or OSMesa (libosmesa6), or set eval.video false")


class FrameSource:
    """Renders the current state of an env as an (H, W, 3) uint8 array; ``close`` frees what it holds."""

    def __init__(self, render: Callable[[], np.ndarray], close: Callable[[], None] = lambda: None) -> None:
        self._render = render
        self._close = close

    def __call__(self) -> np.ndarray:
        return self._render()

    def close(self) -> None:
        self._close()


CAMERAS = ("track", "hand_top")  # the first a model has is filmed


def frame_source(env: Any, env_id: str) -> FrameSource:
    """The frames of ``env`` (a ``make_env`` env): DMC's camera 0, or for a Gymnasium MuJoCo or MyoSuite env the
    model's first camera of ``CAMERAS`` (``track`` follows the body; MyoSuite's hand models have ``hand_top``; the
    free camera where a model has none), off-screen at 480×480."""
    base = env.base_env
    if env_id.startswith(DMC_PREFIX):
        physics = base.physics  # the dm_control env's, through TorchRL's wrapper
        return FrameSource(lambda: physics.render(height=FRAME_SIZE, width=FRAME_SIZE, camera_id=0))
    import mujoco

    unwrapped = getattr(base, "unwrapped", None)
    if not (isinstance(getattr(unwrapped, "model", None), mujoco.MjModel)
            and isinstance(getattr(unwrapped, "data", None), mujoco.MjData)):
        raise VideoError(f"eval.video: env id {env_id!r} has no MuJoCo scene to render; videos are made of "
                         "Gymnasium MuJoCo envs (e.g. 'HalfCheetah-v5'), MyoSuite envs and "
                         "'dm_control/<domain>-<task>' envs. Set eval.video false for this env")
    from gymnasium.envs.mujoco.mujoco_rendering import OffScreenViewer

    found = [mujoco.mj_name2id(unwrapped.model, mujoco.mjtObj.mjOBJ_CAMERA, name) for name in CAMERAS]
    camera = next((index for index in found if index >= 0), -1)  # -1: the free camera
    viewer = OffScreenViewer(unwrapped.model, unwrapped.data, FRAME_SIZE, FRAME_SIZE)  # its own GL context

    def render() -> np.ndarray:
        viewer.make_context_current()
        return viewer.render("rgb_array", camera_id=camera)

    return FrameSource(render, viewer.close)


def frames_per_second(env: Any, env_id: str) -> float:
    """Playback rate for real time: one frame per env step."""
    base = env.base_env
    if env_id.startswith(DMC_PREFIX):
        return 1.0 / float(base.control_timestep())
    return float(base.unwrapped.metadata.get("render_fps") or 1.0 / base.unwrapped.dt)


def open_writer(path: Path, fps: float) -> Any:
    """An imageio writer of H.264 (yuv420p, +faststart) at ``path``; frames go in with ``append_data``."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (imageio finds the ffmpeg binary through it)
    except ImportError as err:
        raise VideoError(f"eval.video needs imageio and imageio-ffmpeg ({err}): {INSTALL_HINT}") from err
    return imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                              macro_block_size=16, ffmpeg_log_level="error",
                              output_params=["-movflags", "+faststart"])


def check_writer() -> None:
    """Encode and decode two small frames, so that a missing or broken codec fails at start-up."""
    import imageio.v2 as imageio

    with tempfile.TemporaryDirectory(prefix="dime-video-check-") as folder:
        path = Path(folder) / "check.mp4"
        try:
            writer = open_writer(path, fps=10.0)
            for value in (0, 255):
                writer.append_data(np.full((16, 16, 3), value, dtype=np.uint8))
            writer.close()
            frames = sum(1 for _ in imageio.get_reader(path, format="FFMPEG"))
        except VideoError:
            raise
        except Exception as err:  # imageio/ffmpeg raise many types
            raise VideoError(f"eval.video: cannot write an H.264 MP4 with imageio-ffmpeg ({type(err).__name__}: "
                             f"{err}): {INSTALL_HINT}") from err
    if frames < 1:
        raise VideoError(f"eval.video: the H.264 MP4 written by imageio-ffmpeg reads back empty: {INSTALL_HINT}")


def check_frame(frame: Any, env_id: str) -> None:
    if not (isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8):
        got = getattr(frame, "shape", type(frame).__name__)
        raise VideoError(f"eval.video: env id {env_id!r} renders {got}, not an (H, W, 3) uint8 image")


def check_video(env_id: str) -> None:
    """Start-up check for ``eval.video``: a GL backend (``choose_gl_backend``), the codec works, and ``env_id``
    renders one frame."""
    choose_gl_backend()
    check_writer()
    env = make_env(env_id)
    render = None
    try:
        try:
            render = frame_source(env, env_id)
            frame = render()
        except VideoError:
            raise
        except Exception as err:  # GL and MuJoCo raise many types
            raise VideoError(f"eval.video: env id {env_id!r} cannot render a frame with "
                             f"MUJOCO_GL={os.environ.get('MUJOCO_GL', '(unset)')} ({type(err).__name__}: {err}); "
                             "try MUJOCO_GL=egl or MUJOCO_GL=osmesa, or set eval.video false") from err
        check_frame(frame, env_id)
    finally:
        if render is not None:
            render.close()
        env.close()


class EpisodeRecorder:
    """Frames of one episode, rendered by ``capture`` and streamed into ``path`` (no frame is kept in memory).

    A failure while rendering or encoding stops the recording, and is kept in ``error``: the evaluation goes
    on and only this video is lost. The file appears at ``path`` only when complete (written beside, then renamed).
    """

    def __init__(self, env: Any, env_id: str, path: Path) -> None:
        self.path = Path(path)
        self.frames = 0
        self.error: str | None = None
        self._tmp = self.path.with_name(f".{self.path.stem}.tmp.mp4")
        self._render: FrameSource | None = None
        self._writer: Any = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._render = frame_source(env, env_id)
            fps = frames_per_second(env, env_id)
            self._writer = open_writer(self._tmp, fps if math.isfinite(fps) and fps > 0 else 30.0)
        except Exception as err:
            self._fail(err)

    def _fail(self, err: Exception) -> None:
        self.error = f"{type(err).__name__}: {err}"
        self._writer = None
        self._free()

    def _free(self) -> None:
        render, self._render = self._render, None
        if render is not None:
            with contextlib.suppress(Exception):  # freeing a GL context that has already failed
                render.close()

    def capture(self) -> None:
        if self._writer is None:
            return
        try:
            self._writer.append_data(self._render())
            self.frames += 1
        except Exception as err:  # rendering or encoding: this video is lost, the evaluation is not
            self._close_writer()
            self._fail(err)

    def _close_writer(self) -> None:
        with contextlib.suppress(Exception):  # closing a writer that has already failed
            self._writer.close()

    def close(self) -> Path | None:
        """Finish the file: its path, or None if nothing usable was recorded (see ``error``)."""
        if self._writer is None:
            self._tmp.unlink(missing_ok=True)
            return None
        writer, self._writer = self._writer, None
        self._free()
        try:
            writer.close()
        except Exception as err:
            self._fail(err)
            self._tmp.unlink(missing_ok=True)
            return None
        if self.frames == 0:
            self.error = "no frame was rendered"
            self._tmp.unlink(missing_ok=True)
            return None
        os.replace(self._tmp, self.path)
        return self.path
