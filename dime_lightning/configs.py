"""The task configs that ship with the package, and how a ``--config`` path names them.

The configs live in ``dime_lightning/conf`` (installed with the package; a checkout's top-level ``conf/`` is a
link to it): per benchmark family a base under ``conf/base/`` (``paper.yaml`` holds the settings shared by every
published task; ``dmc.yaml``, ``gym_mujoco.yaml`` and ``myosuite.yaml`` add the family's value support and
evaluation cadence), and per task a small file that includes its family (``config: base/dmc.yaml``, a path
relative to the task file) and adds its env id and run length. To edit a task outside the package, write its
complete resolved config (``--config conf/ant.yaml --print_config > mine.yaml``) and edit that.

``--config conf/ant.yaml`` reads ``./conf/ant.yaml`` when that file exists (a checkout, or a user's own folder),
else the packaged ``ant.yaml``: the README's commands work after ``pip install`` from any folder.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dime_lightning.errors import BadInputError
from dime_lightning.update_settings import GROUP, OLD_NAMES

CONF_DIR = Path(__file__).resolve().parent / "conf"
PREFIX = "conf/"


def resolve_config_path(path: str) -> str:
    """``path`` itself when it exists; else ``conf/<name>`` → the packaged config of that name; else ``path``
    unchanged (the parser's error then names it).

    path: a ``--config`` value."""
    if Path(path).exists() or not path.startswith(PREFIX):
        return path
    packaged = CONF_DIR / path[len(PREFIX):]
    return str(packaged) if packaged.is_file() and CONF_DIR in packaged.resolve().parents else path


def config_files(argv: list[str]) -> list[str]:
    """The ``--config`` files of ``argv`` in order (``--config X``, ``-c X`` and ``--config=X`` forms).

    argv: command-line arguments."""
    files = []
    for index, arg in enumerate(argv):
        if arg in ("--config", "-c") and index + 1 < len(argv):
            files.append(argv[index + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config`` value passed through ``resolve_config_path``.

    argv: command-line arguments (``--config X``, ``-c X`` and ``--config=X`` forms)."""
    out = list(argv)
    for index, arg in enumerate(out):
        if arg in ("--config", "-c") and index + 1 < len(out):
            out[index + 1] = resolve_config_path(out[index + 1])
        elif arg.startswith("--config="):
            out[index] = "--config=" + resolve_config_path(arg.split("=", 1)[1])
    return out



def _moved_in_file(path: Path, seen: set[Path]) -> list[tuple[str, str]]:
    """(old key, where) of the old update-setting keys under ``model`` in the config file ``path`` and the files
    it includes."""
    if path in seen or not path.is_file():
        return []
    seen.add(path)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return []  # the parser's own error names the file
    if not isinstance(content, dict):
        return []
    model = content.get("model")
    found = [(key, f"in {path}") for key in (model if isinstance(model, dict) else {}) if key in OLD_NAMES]
    includes = content.get("config")
    for include in includes if isinstance(includes, list) else [includes] if includes else []:
        if isinstance(include, str):
            found += _moved_in_file((path.parent / include).resolve(), seen)
    return found


def check_moved_keys(argv: list[str]) -> None:
    """Refuse the update settings' pre-``model.update`` keys (``model.utd`` → ``model.update.utd``, …) on the
    command line and in ``--config`` files (and the files they include), naming each with its new key.

    argv: command-line arguments, config paths already resolved."""
    flags = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--model.")]
    found = [(flag[len("--model."):], "on the command line") for flag in flags if flag[len("--model."):] in OLD_NAMES]
    seen: set[Path] = set()
    for path in config_files(argv):
        found += _moved_in_file(Path(path).resolve(), seen)
    if found:
        moves = "; ".join(f"model.{old} ({where}) is now {GROUP}.{OLD_NAMES[old]}" for old, where in found)
        raise BadInputError(f"the update settings moved into the group {GROUP}: {moves}")
