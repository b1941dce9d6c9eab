"""A test callback (import with PYTHONPATH=tests): sleeps after every training batch (one env step), so that a fit
lasts at least (its env steps) × ``seconds`` however fast the machine is. tests/test_slurm.py uses it for a run
that must outlast one time-limited attempt."""

import time

from lightning.pytorch.callbacks import Callback


class SlowSteps(Callback):
    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
