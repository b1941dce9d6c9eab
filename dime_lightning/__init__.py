"""dime_lightning: DIME (diffusion-based maximum-entropy RL) with PyTorch, Lightning and TorchRL."""

from dime_lightning.actor import DiffusionActor
from dime_lightning.critic import DistributionalCritic, project_distribution
from dime_lightning.policy import Actor, ActorOutput, check_actor
from dime_lightning.temperature import Temperature

__all__ = ["Actor", "ActorOutput", "DiffusionActor", "DistributionalCritic", "Temperature", "check_actor",
           "project_distribution"]
__version__ = "0.1.0"
