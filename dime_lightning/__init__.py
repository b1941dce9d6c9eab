"""dime_lightning: DIME (diffusion-based maximum-entropy RL) with PyTorch, Lightning and TorchRL."""

from dime_lightning.actor import ActorOutput, DiffusionActor
from dime_lightning.critic import DistributionalCritic, project_distribution
from dime_lightning.temperature import Temperature

__all__ = ["ActorOutput", "DiffusionActor", "DistributionalCritic", "Temperature", "project_distribution"]
__version__ = "0.1.0"
