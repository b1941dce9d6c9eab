"""Every private part of Lightning, and every experimental part of torch, that dime_lightning relies on, in one place.

Lightning offers no public API for the first four; each access below checks what it reads and raises
``LibraryChangedError`` (naming the attribute and the installed version) when it is gone or has another
shape, and ``tests/test_compat.py`` runs each one against the installed Lightning and checks its *meaning*
(the cadence, the resume, the checkpoint key, the DDP arguments), so that an upgrade fails a test, not a run.

- ``lightning_logs_this_step``: ``Trainer._logger_connector.should_update_logs`` — whether Lightning writes
  the metrics logged in this batch (``trainer.log_every_n_steps`` counted in Lightning's own batch counter).
- ``reopen_finished_fit``: the fit-loop progress inside a checkpoint (``checkpoint["loops"]["fit_loop"]``),
  rewritten so that resuming a finished run with a larger ``data.total_env_steps`` trains on.
- ``datamodule_checkpoint_key``: the key of the data module's state in a checkpoint (its class's
  ``__qualname__``, as Lightning's checkpoint connector writes and reads it).
- ``add_ddp_kwargs``: ``DDPStrategy._ddp_kwargs``, the arguments a strategy that already exists passes to
  ``DistributedDataParallel`` (a new one takes them publicly as constructor keywords).

- ``compile_ahead_of_time``: ``torch.compile(...).aot_compile`` (torch's ahead-of-time compilation, marked
  experimental in torch 2.13), its artifact's ``disable_guard_check``, and Dynamo's request to trace again
  (``TensorifyScalarRestartAnalysis``, ``TensorifyState``): what "whole" calls on a CPU (``program.AheadOfTime``,
  which checks the layout itself).
- ``graph_break_errors``: Dynamo's ``Unsupported`` and ``UserError``, what tracing into one graph raises for code it
  cannot put in one graph (``program.compile_acting`` falls back to Dynamo's lazy path on them only).

Everything else (LightningCLI, MLFlowLogger, TorchRL, tensordict) is used through public APIs only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from dime_lightning.errors import LibraryChangedError

PROGRESS_COUNTERS = ("ready", "started", "processed", "completed")
ANALYSIS_RESTARTS = 3  # compile_ahead_of_time: new analyses Dynamo may ask for (one per kind of restart it needs)


def _changed(attribute: str, meaning: str, library: str = "lightning") -> LibraryChangedError:
    return LibraryChangedError(
        f"{library} {metadata.version(library)}: {attribute} ({meaning}) is gone or has changed; dime_lightning "
        f"relies on it (dime_lightning/compat.py) and supports the {library} versions pinned in setup.py"
    )


def lightning_logs_this_step(trainer: Any) -> bool:
    """Whether Lightning writes the metrics logged in the current training batch (every
    ``trainer.log_every_n_steps`` batches, and when the trainer stops). Private:
    ``trainer._logger_connector.should_update_logs``."""
    connector = getattr(trainer, "_logger_connector", None)
    value = getattr(connector, "should_update_logs", None)
    if not isinstance(value, bool):
        raise _changed("Trainer._logger_connector.should_update_logs", "whether logs are written after this batch")
    return value


def reopen_finished_fit(checkpoint: dict[str, Any]) -> None:
    """Rewrite a checkpoint's fit-loop progress (in place, before Lightning restores it) so that the loop does
    not count its epoch as complete: DIME's training length is ``data.total_env_steps``, not epochs, and
    Lightning would otherwise end a resumed fit of a finished run's final checkpoint at once. A checkpoint
    without loop state (weights only) has nothing to reopen."""
    loops = checkpoint.get("loops")
    if loops is None:
        return
    where = 'checkpoint["loops"]["fit_loop"]'
    try:
        fit_loop = loops["fit_loop"]
        trackers = [fit_loop["epoch_progress"][part] for part in ("total", "current")]
        batch_progress = fit_loop["epoch_loop.batch_progress"]
        has_last_batch = isinstance(batch_progress["is_last_batch"], bool)
    except (KeyError, TypeError) as error:
        raise _changed(f"{where}: epoch_progress.total/current, epoch_loop.batch_progress.is_last_batch",
                       f"the fit loop's progress; missing {error}") from None
    if not has_last_batch or not all(_is_counter_dict(tracker) for tracker in trackers):
        raise _changed(f"{where}.epoch_progress / epoch_loop.batch_progress",
                       f"epoch counters {', '.join(PROGRESS_COUNTERS)} and a boolean is_last_batch")
    for tracker in trackers:
        tracker.update(dict.fromkeys(tracker, 0))
    batch_progress["is_last_batch"] = False


def _is_counter_dict(tracker: Any) -> bool:
    return (isinstance(tracker, Mapping) and set(tracker) == set(PROGRESS_COUNTERS)
            and all(isinstance(value, int) for value in tracker.values()))


def datamodule_checkpoint_key(datamodule: Any) -> str:
    """The key under which Lightning stores (and looks up) a data module's ``state_dict`` in a checkpoint."""
    return type(datamodule).__qualname__


def add_ddp_kwargs(strategy: Any, kwargs: Mapping[str, Any]) -> None:
    """Add ``kwargs`` to the arguments ``strategy`` (a ``DDPStrategy``) passes to ``DistributedDataParallel``,
    keeping its others. Private: ``DDPStrategy._ddp_kwargs``."""
    ddp_kwargs(strategy).update(kwargs)


def ddp_kwargs(strategy: Any) -> dict[str, Any]:
    """The (live) dict of arguments a ``DDPStrategy`` passes to ``DistributedDataParallel``."""
    current = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(current, dict):
        raise _changed("DDPStrategy._ddp_kwargs", "the keyword arguments passed to DistributedDataParallel")
    return current


def compile_ahead_of_time(compiled: Any, example_args: tuple) -> Callable:
    """``compiled`` (what ``torch.compile(fn, fullgraph=True, ...)`` returned) compiled now for ``example_args``, as a
    callable that runs the compiled code with no guard check and no Dynamo frame evaluation. The caller answers for
    calling it only on what it was compiled for. Experimental in torch: ``aot_compile`` and the artifact's
    ``disable_guard_check``; private: the exception by which Dynamo asks to trace again with some Python floats
    specialized (torch.compile's lazy path does so by itself) and the record of those floats, cleared afterwards."""
    aot_compile = getattr(compiled, "aot_compile", None)
    if not callable(aot_compile):
        raise _changed("torch.compile(...).aot_compile", "compilation ahead of time for example inputs", "torch")
    restart = getattr(importlib.import_module("torch._dynamo.exc"), "TensorifyScalarRestartAnalysis", None)
    record = getattr(importlib.import_module("torch._dynamo.symbolic_convert"), "TensorifyState", None)
    if restart is None or not callable(getattr(record, "clear", None)):
        raise _changed("torch._dynamo TensorifyScalarRestartAnalysis / TensorifyState.clear",
                       "Dynamo asking to trace again with floats specialized", "torch")
    try:
        for attempt in range(ANALYSIS_RESTARTS + 1):
            try:
                artifact = aot_compile((tuple(example_args), {}))
                break
            except restart:
                if attempt == ANALYSIS_RESTARTS:
                    raise
    finally:
        record.clear()  # the floats it named belong to this compilation only
    disable_guard_check = getattr(artifact, "disable_guard_check", None)
    if not callable(disable_guard_check):
        raise _changed("aot_compile(...).disable_guard_check", "calls without the artifact's guard check", "torch")
    disable_guard_check()
    return artifact


def graph_break_errors() -> tuple[type[Exception], ...]:
    """The exceptions by which Dynamo refuses to trace a function into one graph (``fullgraph``): ``Unsupported``
    (a graph break, such as a branch on a tensor's value) and ``UserError``. Private to torch."""
    exc = importlib.import_module("torch._dynamo.exc")
    errors = tuple(getattr(exc, name, None) for name in ("Unsupported", "UserError"))
    if not all(isinstance(error, type) and issubclass(error, Exception) for error in errors):
        raise _changed("torch._dynamo.exc.Unsupported / UserError", "Dynamo's refusal to trace into one graph", "torch")
    return errors
