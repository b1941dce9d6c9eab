"""A test callback (import with PYTHONPATH=tests): each rank saves its module state at the end of training to
``rank<r>-state.pt`` in the working directory, so a test can compare the ranks' parameters and buffers."""

import torch
from lightning.pytorch.callbacks import Callback


class SaveRankState(Callback):
    def on_train_end(self, trainer, pl_module) -> None:
        state = {key: value.detach().cpu() for key, value in pl_module.state_dict().items()}
        torch.save({"state": state, "env_steps": pl_module.env_steps, "world_size": trainer.world_size},
                   f"rank{trainer.global_rank}-state.pt")
