"""Training: one loop that needs no files (:func:`fit`), the :class:`Trainer` that adds run folders (checkpoints,
metrics, evaluation, exact resume, DDP) on top of it, the settings both use, the objectives (maximum likelihood,
classification, GAN, independence cross-entropy) and atomic verified checkpoints. Memory-saving backpropagation
through invertible compositions is the layer ``invertnet.layers.MemorySavingSequential``."""

from invertnet.training.batches import batch_source as batch_source
from invertnet.training.checkpoint import CheckpointError as CheckpointError
from invertnet.training.checkpoint import CheckpointKeyError as CheckpointKeyError
from invertnet.training.checkpoint import CheckpointWarning as CheckpointWarning
from invertnet.training.checkpoint import RunWriteError as RunWriteError
from invertnet.training.checkpoint import latest_checkpoint as latest_checkpoint
from invertnet.training.checkpoint import load_checkpoint as load_checkpoint
from invertnet.training.checkpoint import load_latest_checkpoint as load_latest_checkpoint
from invertnet.training.checkpoint import save_checkpoint as save_checkpoint
from invertnet.training.loop import FitResult as FitResult
from invertnet.training.loop import TrainState as TrainState
from invertnet.training.loop import fit as fit
from invertnet.training.objectives import AdversarialLoss as AdversarialLoss
from invertnet.training.objectives import BitsPerDim as BitsPerDim
from invertnet.training.objectives import ConditionalBitsPerDim as ConditionalBitsPerDim
from invertnet.training.objectives import CrossEntropy as CrossEntropy
from invertnet.training.objectives import IndependenceCrossEntropy as IndependenceCrossEntropy
from invertnet.training.objectives import IndependenceLosses as IndependenceLosses
from invertnet.training.objectives import balanced_accuracy as balanced_accuracy
from invertnet.training.objectives import bits_per_sample as bits_per_sample
from invertnet.training.objectives import core_balanced_accuracy as core_balanced_accuracy
from invertnet.training.objectives import mean_and_standard_error as mean_and_standard_error
from invertnet.training.objectives import random_flip as random_flip
from invertnet.training.objectives import random_shift as random_shift
from invertnet.training.settings import TrainConfig as TrainConfig
from invertnet.training.trainer import Trainer as Trainer
from invertnet.training.weights import WeightChoice as WeightChoice
from invertnet.training.weights import choose_weights as choose_weights
from invertnet.training.weights import compare_weights as compare_weights
from invertnet.training.weights import kept_weights as kept_weights

__all__ = [
    "AdversarialLoss",
    "BitsPerDim",
    "ConditionalBitsPerDim",
    "CheckpointError",
    "CheckpointKeyError",
    "CheckpointWarning",
    "CrossEntropy",
    "FitResult",
    "IndependenceCrossEntropy",
    "IndependenceLosses",
    "RunWriteError",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "WeightChoice",
    "balanced_accuracy",
    "core_balanced_accuracy",
    "batch_source",
    "bits_per_sample",
    "choose_weights",
    "compare_weights",
    "fit",
    "kept_weights",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "mean_and_standard_error",
    "random_flip",
    "random_shift",
    "save_checkpoint",
]
