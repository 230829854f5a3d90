r"""Invariance of invertible classifiers (thesis ch. 6): metameric sampling (Definition 6.8) and the
independence cross-entropy (Definition 6.14)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from invertnet.models.classifiers import FullyInvertibleClassifier

__all__ = ["IndependenceCrossEntropy", "metameric_sample"]


@torch.no_grad()
def metameric_sample(
    model: FullyInvertibleClassifier, x: Tensor, x_reference: Tensor, **solver_options: object
) -> Tensor:
    r"""x_met = F^{-1}(z_s, z~_n): the logits of x with the nuisance variables of x_reference (thesis Def. 6.8).

    The classifier cannot tell x_met from x (their logits agree up to the inverse's tolerance), while x_met
    carries everything else of the reference; if x_met looks like the reference, the classifier is invariant
    to the change from x to x_met (an invariance-based adversarial example, Definition 6.3).

    Arguments:
        model: A :class:`~invertnet.models.FullyInvertibleClassifier`, in eval mode.
        x: Inputs (B, ...) whose logits are kept.
        x_reference: Inputs (B, ...) whose nuisance variables are kept.
        **solver_options: ``atol``, ``rtol``, ``max_iter``, ``strict`` of the inverse.
    """
    if x.shape != x_reference.shape:
        raise ValueError(f"metameric_sample: x {tuple(x.shape)} and x_reference {tuple(x_reference.shape)} differ")
    z, z_reference = model.features(x), model.features(x_reference)
    semantic, _ = model.split(z)
    _, nuisance = model.split(z_reference)
    return model.invert_features(model.merge(semantic, nuisance, z), **solver_options)


class IndependenceCrossEntropy(nn.Module):
    r"""The independence cross-entropy of thesis Definition 6.14, as one scalar for simultaneous training.

    .. math:: L_{iCE}(\theta, \theta_{nc}) = \mathrm{CE}(z_s, y) - \mathrm{CE}(D_{\theta_{nc}}(z_n), y),
        \qquad \min_\theta \max_{\theta_{nc}} L_{iCE}

    with (z_s, z_n) = F_theta(x) split into logits and nuisance variables (Definition 6.7) and D_nc a nuisance
    classifier that tries to predict y from z_n. Minimising over theta keeps the logits informative and makes
    z_n uninformative about y (it decreases I(Y; Z_n), Lemma 6.15). The returned loss is
    CE(z_s, y) + CE(D_nc(z_n detached), y) - CE(D_nc with detached parameters (z_n), y): the nuisance
    classifier's parameters receive only the gradient of its own cross-entropy (it maximises L_iCE) and the
    bijection's only that of L_iCE (``torch.func.functional_call``), so one optimiser step is a simultaneous
    gradient step of the min-max problem. Batches are ``(x, y)``; pass this module as the trainer's model
    (it holds both players' parameters) and as its objective.

    Arguments:
        classifier: The :class:`~invertnet.models.FullyInvertibleClassifier`.
        nuisance_features: d - C, the number of nuisance variables: builds the default nuisance classifier, an
            MLP with one hidden layer of ``hidden`` units.
        nuisance_classifier: Or an own module mapping z_n (B, d - C) to logits (B, C).
        nuisance_weight: lambda in CE(z_s, y) - lambda CE(D(z_n), y) for the bijection (1 in Def. 6.14). The
            nuisance cross-entropy is unbounded above, so with lambda = 1 the bijection can win the game by
            making the nuisance classifier confidently wrong instead of uninformed; smaller values keep the
            logits' cross-entropy in charge (measured on digits: see the issue note).
    """

    name = "independence_cross_entropy"

    def __init__(
        self,
        classifier: FullyInvertibleClassifier,
        nuisance_features: int | None = None,
        nuisance_classifier: nn.Module | None = None,
        hidden: int = 128,
        nuisance_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if nuisance_weight < 0:
            raise ValueError(f"IndependenceCrossEntropy: nuisance_weight must be >= 0, got {nuisance_weight}")
        self.nuisance_weight = nuisance_weight
        if (nuisance_features is None) == (nuisance_classifier is None):
            raise ValueError("IndependenceCrossEntropy: give exactly one of nuisance_features, nuisance_classifier")
        if nuisance_classifier is None:
            nuisance_classifier = nn.Sequential(
                nn.Linear(nuisance_features, hidden), nn.ELU(), nn.Linear(hidden, classifier.n_classes)
            )
        self.classifier, self.nuisance_classifier = classifier, nuisance_classifier

    def losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(CE of the logits, CE of the nuisance classifier on detached z_n, CE of the frozen nuisance
        classifier on z_n)."""
        semantic, nuisance = self.classifier.split(self.classifier.features(x))
        adversary = self.nuisance_classifier
        semantic_loss = F.cross_entropy(semantic, y)
        adversary_loss = F.cross_entropy(adversary(nuisance.detach()), y)
        frozen = {name: value.detach() for name, value in adversary.named_parameters()}
        leaked = F.cross_entropy(functional_call(adversary, frozen, (nuisance,)), y)
        return semantic_loss, adversary_loss, leaked

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        semantic_loss, adversary_loss, leaked = self.losses(*batch)
        return semantic_loss + adversary_loss - self.nuisance_weight * leaked

    @torch.no_grad()
    def evaluate(self, data: tuple[Tensor, Tensor], batch_size: int = 256) -> dict[str, float]:
        """Accuracy of the logits and of the nuisance classifier (chance level means z_n hides y)."""
        x, y = data
        semantic, nuisance = [], []
        for chunk in x.split(batch_size):
            logits, rest = self.classifier.split(self.classifier.features(chunk))
            semantic.append(logits)
            nuisance.append(self.nuisance_classifier(rest))
        semantic_logits, nuisance_logits = torch.cat(semantic), torch.cat(nuisance)
        return {
            "accuracy": (semantic_logits.argmax(1) == y).double().mean().item(),
            "cross_entropy": F.cross_entropy(semantic_logits, y).item(),
            "nuisance_accuracy": (nuisance_logits.argmax(1) == y).double().mean().item(),
            "nuisance_cross_entropy": F.cross_entropy(nuisance_logits, y).item(),
        }
