"""What ``auto`` means for the three speed settings, ``model.update.compile``, ``model.compile_act`` and
``data.storage``: one table, resolved at the start of a fit from the device, the number of processes and the run's
length. The module and the data module call these functions; BENCHMARKS.md holds the measurements behind them.

================  ==========================================  ==============================================
setting           CUDA                                        CPU
================  ==========================================  ==============================================
update compile    'whole' in one process (checked at start-up  'whole' in one process when the run has at least
                  against eager, eager on a mismatch);        ``WHOLE_MIN_LEARNING_STEPS`` learning env steps,
                  'none' with several processes or bf16       else 'none'; 'none' with several processes or
                                                              bf16
compile_act       'reduce-overhead' (acting as a CUDA graph)  'default' where the update is 'whole' (a long run
                                                              in one process), else 'none'
storage           'device' when the buffer takes at most      'memory'
                  ``DEVICE_STORAGE_SHARE`` of the free GPU
                  memory, else 'memory'
================  ==========================================  ==============================================

Why (BENCHMARKS.md, "Fast by default"): on one CPU core "whole" ran the learning step at 0.19× eager's time at the
dispatch-bound size and 0.63× at CPU size, and the Pendulum demo's learning phase at 0.81×; but its two programs
took 70 s (dispatch size) and 4.3 min (CPU size, the demo) to compile, which ≈ 7,000 and ≈ 6,100 learning steps earn
back. The threshold leaves a margin, so that ``auto`` never makes a run slower: the demo (7,000 learning steps) stays
eager. Several processes stay eager because "whole" runs in one process and the compiled losses have not been
tested under DDP; bf16-mixed stays eager because that is the combination its tests cover. The CUDA choices follow
the GPU design (a launch-bound update); they have not been measured on a GPU. Acting compiled on a CPU (ahead of
time, ``program.compile_acting``) took 0.025 against 0.26 ms per action eagerly at the dispatch-bound size and 0.48
against 2.2 ms at CPU size, its first call 12 s (the process's first compile) and 7–8 s with cold caches; right
after an update 35 µs, where Dynamo's compiled ``act`` took 132 µs. It follows the update, compiled in the runs
long enough for both (BENCHMARKS.md, "Acting").
"""

from __future__ import annotations

# learning env steps (data.total_env_steps − data.learning_starts) from which "whole" pays for its compile on a CPU,
# with a margin (break-even measured at ≈ 6,100–7,000)
WHOLE_MIN_LEARNING_STEPS = 10_000
DEVICE_STORAGE_SHARE = 0.5  # of the free GPU memory, at most, for a replay buffer on the device


def update_mode(device_type: str, processes: int, learning_env_steps: int | None, mixed_precision: bool = False) -> str:
    """The update's compile mode for ``auto``. ``learning_env_steps`` None: unknown (eager on a CPU).
    ``mixed_precision`` (bf16-mixed): eager, the combination tested with it."""
    if processes > 1 or mixed_precision:
        return "none"
    if device_type == "cuda":
        return "whole"
    long_run = learning_env_steps is not None and learning_env_steps >= WHOLE_MIN_LEARNING_STEPS
    return "whole" if device_type == "cpu" and long_run else "none"


def act_mode(device_type: str, update_mode: str) -> str:
    """Acting's compile mode for ``auto``: one CUDA graph per action on a GPU; on a CPU compiled where the update
    (``update_mode``, as resolved) is "whole", i.e. in a run long enough for compiling to pay, else eager."""
    if device_type == "cuda":
        return "reduce-overhead"
    return "default" if update_mode == "whole" else "none"


def storage(device_type: str, need_bytes: int, free_device_bytes: int | None) -> str:
    """The replay storage for ``auto``: on the GPU when ``need_bytes`` fits in ``DEVICE_STORAGE_SHARE`` of its free
    memory (``free_device_bytes``), in RAM otherwise."""
    fits = free_device_bytes is not None and need_bytes <= DEVICE_STORAGE_SHARE * free_device_bytes
    return "device" if device_type == "cuda" and fits else "memory"
