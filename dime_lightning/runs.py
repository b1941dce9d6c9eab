"""What identifies a run in MLflow, without importing Lightning: the store's URI (one fallback for every
command), the run's default name and its tags."""

from __future__ import annotations

import os
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(given: str | None) -> str:
    """``given``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory.

    given: the URI a command was given (``--tracking_uri``, ``mlflow.tracking_uri``), or None."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


ACTOR_LABELS = {"DiffusionActor": "DIME", "TanhGaussianActor": "Gaussian"}


def actor_label(value: str) -> str:
    """``dime_lightning.gaussian.TanhGaussianActor`` (or ``TanhGaussianActor``) → ``Gaussian``; other values as they
    are (a group value of ``compare``, e.g. a seed).

    value: an actor class path, or any other value."""
    return ACTOR_LABELS.get(str(value).rpartition(".")[2], str(value))


def run_tags(config: dict[str, Any]) -> dict[str, str]:
    """The tags of a run, from its resolved config: ``dime.task`` (env id), ``dime.actor`` (``DIME``, ``Gaussian``
    or the class path), ``dime.seed`` and ``dime.compile`` (the update's compile mode). The MLflow UI and
    ``compare --group_by tags.dime.actor`` group by them.

    config: the resolved fit config (``model``, ``data``, ``seed_everything``)."""
    model, data = config.get("model") or {}, config.get("data") or {}
    actor = (model.get("actor") or {}).get("class_path", "") if isinstance(model.get("actor"), dict) else ""
    return {"dime.task": str(data.get("env_id")), "dime.actor": actor_label(actor),
            "dime.seed": str(config.get("seed_everything")),
            "dime.compile": str((model.get("update") or {}).get("compile"))}


def mode_tags(modes: dict[str, str], storage: str | None) -> dict[str, str]:
    """The modes a fit resolved from its ``auto`` settings (dime_lightning.auto), as tags: ``dime.compile`` (in place
    of the configured value), ``dime.compile_act`` and ``dime.storage``.

    modes: ``DIMEModule.modes``; storage: the data module's resolved storage (None: not known)."""
    tags = {"dime.compile": modes["compile"], "dime.compile_act": modes["compile_act"]}
    return tags if storage is None else {**tags, "dime.storage": storage}


def default_run_name(config: dict[str, Any]) -> str:
    """``<env id>-<actor>-seed<seed>``, e.g. ``Pendulum-v1-DIME-seed0``: the run name when none is given.

    config: the resolved fit config."""
    tags = run_tags(config)
    return f"{tags['dime.task']}-{tags['dime.actor']}-seed{tags['dime.seed']}"
