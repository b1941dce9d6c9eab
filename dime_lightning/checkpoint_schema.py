"""The checkpoint schema: what a dime_lightning checkpoint holds beyond Lightning's own entries, with the one reader
and writer of each key. Every module that reads or writes these entries goes through this one.

=======================  ========================================================  =========================
key                      content                                                   written by
=======================  ========================================================  =========================
``dime_layout``          the layout version, ``LAYOUT`` (absent: layout 1)          ``DIMEModule``
``dime_counters``        ``Counters``: env steps (the one place they are kept),     ``DIMEModule``
                         critic, actor and skipped updates
``dime_config``          the resolved config, plain data (rebuilds a policy)        ``ConfigInCheckpoint``
``mlflow``               ``{run_id, experiment_id}`` of the run                     ``MLflowRunInfo`` (rank 0)
``hyper_parameters``     the module's init args; the update settings as plain       Lightning
                         data under ``"update"``
the data module's entry  local env steps, buffer-dump name, per-rank RNG states     ``ReplayDataModule``
                         (key: ``compat.datamodule_checkpoint_key``)
=======================  ========================================================  =========================

Layout 1 (before ``dime_layout``) kept the update settings at the top of ``hyper_parameters`` and of the config's
``model`` (``compile`` was ``compile_update``) and the env steps also in the data module's entry. ``upgrade``
rewrites a layout-1 checkpoint in memory and ``read_checkpoint`` applies it: every reader of a checkpoint file goes
through it, so old checkpoints resume and load as new ones (Lightning's own load during a resume reads the weights,
optimizer states and counters, whose layout did not change). ``DIMEModule.load_from_checkpoint`` is not a way to
load them: it would build a layout-1 module with the default update settings (``analysis.load_policy`` is).

Reading is weights-only (``safe_checkpoint``): a file that would need any type beyond tensors, plain containers
and numpy's RNG-state array is refused before it is unpickled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dime_lightning.errors import CheckpointError, UnsafeCheckpoint
from dime_lightning.safe_checkpoint import UnreadableCheckpointError, UnsafeCheckpointError, safe_load
from dime_lightning.update_settings import OLD_NAMES

LAYOUT = 2
LAYOUT_KEY = "dime_layout"
COUNTERS_KEY = "dime_counters"
CONFIG_KEY = "dime_config"
MLFLOW_KEY = "mlflow"
HPARAMS_KEY = "hyper_parameters"  # Lightning's
REQUIRED_KEYS = ("state_dict", COUNTERS_KEY, HPARAMS_KEY)


@dataclass(frozen=True)
class Counters:
    """Progress of a run. env_steps: env steps collected, summed over ranks; critic_updates, actor_updates:
    updates run (skipped ones included); skipped_updates: updates undone for a non-finite loss."""

    env_steps: int
    critic_updates: int
    actor_updates: int
    skipped_updates: int = 0


def write_counters(checkpoint: dict[str, Any], counters: Counters) -> None:
    checkpoint[COUNTERS_KEY] = dataclasses.asdict(counters)
    checkpoint[LAYOUT_KEY] = LAYOUT


def counters(checkpoint: dict[str, Any]) -> Counters:
    saved = checkpoint[COUNTERS_KEY]
    return Counters(int(saved["env_steps"]), int(saved["critic_updates"]), int(saved["actor_updates"]),
                    int(saved.get("skipped_updates", 0)))


def env_steps(checkpoint: dict[str, Any]) -> int | None:
    """The env steps a checkpoint was written at (None when it does not say)."""
    value = (checkpoint.get(COUNTERS_KEY) or {}).get("env_steps")
    return None if value is None else int(value)


def write_config(checkpoint: dict[str, Any], config: dict[str, Any]) -> None:
    checkpoint[CONFIG_KEY] = config


def config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The resolved config the run was started with (empty when none was stored)."""
    stored = checkpoint.get(CONFIG_KEY)
    return stored if isinstance(stored, dict) else {}


def write_mlflow_run(checkpoint: dict[str, Any], run_id: str, experiment_id: str) -> None:
    checkpoint[MLFLOW_KEY] = {"run_id": run_id, "experiment_id": experiment_id}


def mlflow_run_id(checkpoint: dict[str, Any]) -> str | None:
    return (checkpoint.get(MLFLOW_KEY) or {}).get("run_id")


def dims(checkpoint: dict[str, Any]) -> tuple[Any, Any]:
    """(obs_dim, action_dim) the networks were built for, as stored (check before trusting)."""
    hparams = checkpoint[HPARAMS_KEY]
    return hparams.get("obs_dim"), hparams.get("action_dim")


def data_state(checkpoint: dict[str, Any], key: str) -> dict[str, Any]:
    """The data module's entry (``key``: ``compat.datamodule_checkpoint_key``; empty when absent)."""
    return checkpoint.get(key) or {}


def _nest_update_settings(mapping: dict[str, Any]) -> None:
    """Layout 1 → 2 in one mapping (hyper_parameters, or the config's model): the settings under "update"."""
    moved = {new: mapping.pop(old) for old, new in OLD_NAMES.items() if old in mapping}
    if moved:
        mapping["update"] = {**moved, **(mapping.get("update") or {})}


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a layout-1 checkpoint as layout 2, in place (a no-op on layout 2); returns it."""
    if checkpoint.get(LAYOUT_KEY, 1) >= LAYOUT:
        return checkpoint
    if isinstance(checkpoint.get(HPARAMS_KEY), dict):
        _nest_update_settings(checkpoint[HPARAMS_KEY])
    model = config(checkpoint).get("model")
    if isinstance(model, dict):
        _nest_update_settings(model)
    checkpoint[LAYOUT_KEY] = LAYOUT
    return checkpoint


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load (memory-mapped, weights only) and sanity-check a checkpoint, upgraded to this layout; a clear error
    for corrupt, foreign, unsafe or newer files."""
    try:
        checkpoint = safe_load(path)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpoint(str(err)) from err
    except UnreadableCheckpointError as err:
        raise CheckpointError(str(err)) from err
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read (corrupt or truncated?): "
                              f"{type(err).__name__}: {err}") from err
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {path} is not a dime_lightning checkpoint (missing {REQUIRED_KEYS})")
    layout = checkpoint.get(LAYOUT_KEY, 1)
    if not isinstance(layout, int) or layout > LAYOUT:
        raise CheckpointError(f"checkpoint {path} has layout {layout!r}, newer than this version reads ({LAYOUT}): "
                              "upgrade dime_lightning")
    return upgrade(checkpoint)
