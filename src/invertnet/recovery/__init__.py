"""Latent-code recovery for generative networks from partial measurements (Ma, Ayaz & Karaman 2018)."""

from invertnet.recovery.masks import MASK_KINDS as MASK_KINDS
from invertnet.recovery.masks import Mask as Mask
from invertnet.recovery.masks import make_mask as make_mask
from invertnet.recovery.recover import RecoveryResult as RecoveryResult
from invertnet.recovery.recover import recover as recover
from invertnet.recovery.studies import Landscape as Landscape
from invertnet.recovery.studies import NegativeMultiple as NegativeMultiple
from invertnet.recovery.studies import PhaseTransitionRow as PhaseTransitionRow
from invertnet.recovery.studies import loss_landscape as loss_landscape
from invertnet.recovery.studies import negative_multiple as negative_multiple
from invertnet.recovery.studies import phase_transition as phase_transition
from invertnet.recovery.studies import plot_landscapes as plot_landscapes
from invertnet.recovery.studies import plot_phase_transition as plot_phase_transition
from invertnet.recovery.studies import theorem_network as theorem_network
from invertnet.recovery.studies import write_phase_transition_csv as write_phase_transition_csv

__all__ = [
    "MASK_KINDS",
    "Landscape",
    "Mask",
    "NegativeMultiple",
    "PhaseTransitionRow",
    "RecoveryResult",
    "loss_landscape",
    "make_mask",
    "negative_multiple",
    "phase_transition",
    "plot_landscapes",
    "plot_phase_transition",
    "theorem_network",
    "recover",
    "write_phase_transition_csv",
]
