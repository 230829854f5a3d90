"""Training: the maximum-likelihood trainer and atomic, verified checkpoints."""

from invertnet.training.checkpoint import CheckpointError as CheckpointError
from invertnet.training.checkpoint import latest_checkpoint as latest_checkpoint
from invertnet.training.checkpoint import load_checkpoint as load_checkpoint
from invertnet.training.checkpoint import save_checkpoint as save_checkpoint
from invertnet.training.trainer import TrainConfig as TrainConfig
from invertnet.training.trainer import Trainer as Trainer

__all__ = ["CheckpointError", "TrainConfig", "Trainer", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
