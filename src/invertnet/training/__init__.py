"""Training: the trainer, its objectives (maximum likelihood, classification, GAN) and atomic, verified checkpoints.
Memory-saving backpropagation through invertible compositions is the layer
``invertnet.layers.MemorySavingSequential``."""

from invertnet.training.checkpoint import CheckpointError as CheckpointError
from invertnet.training.checkpoint import latest_checkpoint as latest_checkpoint
from invertnet.training.checkpoint import load_checkpoint as load_checkpoint
from invertnet.training.checkpoint import save_checkpoint as save_checkpoint
from invertnet.training.objectives import AdversarialLoss as AdversarialLoss
from invertnet.training.objectives import BitsPerDim as BitsPerDim
from invertnet.training.objectives import ConditionalGAN as ConditionalGAN
from invertnet.training.objectives import CrossEntropy as CrossEntropy
from invertnet.training.objectives import bits_per_sample as bits_per_sample
from invertnet.training.objectives import mean_and_standard_error as mean_and_standard_error
from invertnet.training.trainer import TrainConfig as TrainConfig
from invertnet.training.trainer import Trainer as Trainer

__all__ = [
    "AdversarialLoss",
    "BitsPerDim",
    "CheckpointError",
    "ConditionalGAN",
    "CrossEntropy",
    "TrainConfig",
    "Trainer",
    "bits_per_sample",
    "latest_checkpoint",
    "load_checkpoint",
    "mean_and_standard_error",
    "save_checkpoint",
]
