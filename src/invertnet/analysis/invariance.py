r"""Invariance of invertible classifiers (thesis ch. 6): metameric sampling (Definition 6.8) and the
independence cross-entropy (Definition 6.14)."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from invertnet.models.classifiers import FullyInvertibleClassifier

__all__ = ["IndependenceCrossEntropy", "IndependenceLosses", "metameric_sample", "nuisance_probe"]


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


NUISANCE_OBJECTIVES = ("confusion", "cross_entropy")


class IndependenceLosses(NamedTuple):
    """The terms of the independence cross-entropy for one batch (batch means)."""

    semantic: Tensor
    """CE(z_s, y): the logits' cross-entropy (L_sCE of Def. 6.14)."""
    adversary: Tensor
    """CE(D_nc(z_n), y) with z_n detached: what the nuisance classifier minimises (-L_nCE)."""
    nuisance: Tensor
    """What the bijection minimises through z_n, D_nc's parameters detached: -CE(D_nc(z_n), y) (Def. 6.14) or
    the confusion CE(D_nc(z_n), uniform) = -mean_j log D_nc(z_n)_j."""
    nuisance_nll: Tensor
    """-(log p(z_n) + log|det J_F(x)|) / d in nats per input dimension (L_MLEn of Eq. 6.13)."""


class IndependenceCrossEntropy(nn.Module):
    r"""The independence cross-entropy of thesis Definition 6.14 with the likelihood term of Eq. 6.13, as one
    scalar for simultaneous training of the bijection and the nuisance classifier.

    The nuisance classifier D_nc learns to predict y from the nuisance variables z_n; the bijection F_theta
    (with (z_s, z_n) = F_theta(x) split into logits and nuisance, Definition 6.7) minimises

    .. math:: \mathrm{CE}(z_s, y) + \lambda\, N(D_{\theta_{nc}}(z_n), y)
        - \frac{\mu}{d} \Big(\sum_k \log p_k\big((z_n)_k\big) + \log|\det J_{F_\theta}(x)|\Big)

    with p_k = N(beta_k, gamma_k^2) a factorial prior with learned beta, gamma (Eq. 6.13). The nuisance term N
    is, with ``nuisance_objective="cross_entropy"``, -CE(D(z_n), y): exactly the min-max problem
    min_theta max_theta_nc L_iCE of Def. 6.14, which decreases the variational bound on I(Y; Z_n)
    (Lemma 6.15). That cross-entropy is unbounded above: the bijection can win by making D confidently
    wrong instead of uninformed, and on digits it does (the game oscillates and the logits lose about 25
    points of accuracy, see the issue note). The default ``"confusion"`` makes z_n uninformative by driving D's
    prediction to the uniform distribution, N = -(1/C) sum_j log D(z_n)_j >= log C, a bounded objective with
    the same optimum: under the Bayes-optimal D, N = log C exactly when p(y | z_n) is uniform, i.e. z_n holds
    no information about a balanced label (the bounded divergence the thesis suggests in Remark 6.20).
    The likelihood term makes z_s and z_n independent (Lemma 6.19) and keeps z_n where the prior puts it; its
    log-determinant is the body's own (power series and Hutchinson for i-ResNet blocks, thesis 5.1), per
    input dimension like bits/dim.

    The returned loss is semantic + adversary + lambda nuisance + mu nuisance_nll (see
    :class:`IndependenceLosses`): the nuisance classifier's parameters receive only the gradient of its own
    cross-entropy and the bijection's and prior's only that of the objective above
    (``torch.func.functional_call``), so one optimiser step is a simultaneous gradient step of the game.
    Batches are ``(x, y)``; pass this module as the trainer's model (it holds both players' parameters) and
    as its objective. Whether z_n really hides y is for a fresh classifier to tell: :func:`nuisance_probe`.

    Arguments:
        classifier: The :class:`~invertnet.models.FullyInvertibleClassifier`; give it dense blocks
            (``fully_invertible_classifier(dense_blocks=...)``) so that the label can leave every z_n entry.
        nuisance_features: d - C, the number of nuisance variables.
        nuisance_classifier: A module mapping z_n (B, d - C) to logits (B, C); by default an MLP with one
            hidden layer of ``hidden`` units.
        nuisance_weight: lambda (1 in Def. 6.14).
        likelihood_weight: mu (1 in Eq. 6.13; 0 for Def. 6.14 alone).
        nuisance_objective: ``"confusion"`` (default) or ``"cross_entropy"`` (Def. 6.14 as written).

    Example:
        >>> from invertnet.models import fully_invertible_classifier
        >>> model = fully_invertible_classifier((1, 4, 4), 2, n_blocks=1, hidden_channels=4, dense_blocks=1)
        >>> objective = IndependenceCrossEntropy(model, nuisance_features=14, hidden=8)
        >>> objective((torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,)))).shape
        torch.Size([])
    """

    name = "independence_cross_entropy"

    def __init__(
        self,
        classifier: FullyInvertibleClassifier,
        nuisance_features: int,
        nuisance_classifier: nn.Module | None = None,
        hidden: int = 128,
        nuisance_weight: float = 1.0,
        likelihood_weight: float = 1.0,
        nuisance_objective: Literal["confusion", "cross_entropy"] = "confusion",
    ) -> None:
        super().__init__()
        for label, value in (("nuisance_weight", nuisance_weight), ("likelihood_weight", likelihood_weight)):
            if value < 0:
                raise ValueError(f"IndependenceCrossEntropy: {label} must be >= 0, got {value}")
        if nuisance_objective not in NUISANCE_OBJECTIVES:
            raise ValueError(
                f"IndependenceCrossEntropy: nuisance_objective must be one of {NUISANCE_OBJECTIVES}, "
                f"got {nuisance_objective!r}"
            )
        if nuisance_features < 1:
            raise ValueError(f"IndependenceCrossEntropy: need at least one nuisance feature, got {nuisance_features}")
        self.nuisance_weight, self.likelihood_weight = nuisance_weight, likelihood_weight
        self.nuisance_objective = nuisance_objective
        if nuisance_classifier is None:
            nuisance_classifier = nn.Sequential(
                nn.Linear(nuisance_features, hidden), nn.ELU(), nn.Linear(hidden, classifier.n_classes)
            )
        self.classifier, self.nuisance_classifier = classifier, nuisance_classifier
        self.prior_mean = nn.Parameter(torch.zeros(nuisance_features))
        self.prior_log_scale = nn.Parameter(torch.zeros(nuisance_features))

    def losses(self, x: Tensor, y: Tensor) -> IndependenceLosses:
        """The terms of the objective on a batch x (B, ...), y (B,) (see :class:`IndependenceLosses`)."""
        z, log_det = self.classifier.body.forward_and_log_det(x)
        semantic, nuisance = self.classifier.split(z)
        if nuisance.shape[1] != self.prior_mean.numel():
            raise ValueError(
                f"IndependenceCrossEntropy: {nuisance.shape[1]} nuisance variables, built for {self.prior_mean.numel()}"
            )
        adversary = self.nuisance_classifier
        frozen = {name: value.detach() for name, value in adversary.named_parameters()}
        log_probabilities = functional_call(adversary, frozen, (nuisance,)).log_softmax(1)
        if self.nuisance_objective == "confusion":
            nuisance_term = -log_probabilities.mean(1).mean()
        else:
            nuisance_term = -F.nll_loss(log_probabilities, y)
        standardized = (nuisance - self.prior_mean) * torch.exp(-self.prior_log_scale)
        log_prior = -0.5 * (standardized.square() + math.log(2 * math.pi)) - self.prior_log_scale
        return IndependenceLosses(
            semantic=F.cross_entropy(semantic, y),
            adversary=F.cross_entropy(adversary(nuisance.detach()), y),
            nuisance=nuisance_term,
            nuisance_nll=-((log_prior.sum(1) + log_det) / x[0].numel()).mean(),
        )

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        terms = self.losses(*batch)
        return (
            terms.semantic
            + terms.adversary
            + self.nuisance_weight * terms.nuisance
            + self.likelihood_weight * terms.nuisance_nll
        )

    @torch.no_grad()
    def evaluate(self, data: tuple[Tensor, Tensor], batch_size: int = 256) -> dict[str, float]:
        """Accuracy and cross-entropy of the logits and of the co-trained nuisance classifier."""
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


def nuisance_probe(
    model: FullyInvertibleClassifier,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    steps: int = 1000,
    hidden: int = 128,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> dict[str, float]:
    r"""How much a fresh classifier learns about y from the nuisance variables z_n of a trained model.

    Trains an MLP (one hidden layer of ``hidden`` ELU units, Adam) on the frozen z_n of ``train`` and evaluates
    it on ``test``. Its test cross-entropy gives the variational lower bound of Lemma 6.15 (Barber and Agakov),
    I(Y; Z_n) >= H(Y) - CE, in nats with H(Y) the entropy of the test labels; an accuracy at ``chance`` (the
    most frequent test class) means z_n holds no label information this probe can use. Unlike the co-trained
    nuisance classifier of :class:`IndependenceCrossEntropy`, the probe never played the game, so the
    bijection cannot have fooled it.

    Arguments:
        model: A :class:`~invertnet.models.FullyInvertibleClassifier` (put in eval mode here).
        train, test: ``(x, y)`` pairs.
        steps, hidden, lr, batch_size, seed: The probe and its training.
    """
    model.eval()
    with torch.no_grad():
        z_train = torch.cat([model.split(model.features(chunk))[1] for chunk in train[0].split(256)])
        z_test = torch.cat([model.split(model.features(chunk))[1] for chunk in test[0].split(256)])
    n_classes = model.n_classes
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = nn.Sequential(nn.Linear(z_train.shape[1], hidden), nn.ELU(), nn.Linear(hidden, n_classes))
    probe = probe.to(device=z_train.device, dtype=z_train.dtype)
    mean, scale = z_train.mean(0), z_train.std(0).clamp_min(1e-12)  # the probe sees standardised z_n
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(0, len(z_train), (min(batch_size, len(z_train)),), generator=generator)
        loss = F.cross_entropy(probe((z_train[index] - mean) / scale), train[1][index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = probe((z_test - mean) / scale)
    frequencies = torch.bincount(test[1], minlength=n_classes).double() / len(test[1])
    present = frequencies[frequencies > 0]
    label_entropy = -(present * present.log()).sum().item()
    cross_entropy = F.cross_entropy(logits, test[1]).item()
    return {
        "probe_accuracy": (logits.argmax(1) == test[1]).double().mean().item(),
        "probe_cross_entropy": cross_entropy,
        "chance": frequencies.max().item(),
        "mutual_information_lower_bound": label_entropy - cross_entropy,
    }
