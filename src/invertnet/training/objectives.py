r"""Training objectives as modules (so that DistributedDataParallel sees the forward pass), with evaluation.

An objective maps a batch to a scalar loss (``forward``) and a data set to its test metrics (``evaluate``);
``name`` is the metric the loss reports (``train_<name>`` in ``metrics.jsonl``).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from invertnet.models.classifiers import FullyInvertibleClassifier
from invertnet.models.flows import FlowDistribution
from invertnet.models.gan import ConditionalGAN

__all__ = [
    "AdversarialLoss",
    "BitsPerDim",
    "ConditionalBitsPerDim",
    "CrossEntropy",
    "IndependenceCrossEntropy",
    "IndependenceLosses",
    "balanced_accuracy",
    "core_balanced_accuracy",
    "bits_per_sample",
    "mean_and_standard_error",
    "random_flip",
    "random_shift",
]


@torch.no_grad()
def bits_per_sample(flow: FlowDistribution, data: Tensor, batch_size: int = 256) -> Tensor:
    """bits/dim of every sample of ``data``, shape (N,), computed in chunks of ``batch_size``."""
    return torch.cat([flow.bits_per_dim(chunk) for chunk in data.split(batch_size)])


def mean_and_standard_error(bits: Tensor) -> dict[str, float]:
    """``{"bits_per_dim": mean, "standard_error": std / sqrt(N)}`` over samples."""
    return {"bits_per_dim": bits.mean().item(), "standard_error": (bits.std() / math.sqrt(len(bits))).item()}


def balanced_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """The mean over classes of the recall, (1/C) sum_c TP_c / P_c (thesis 7.4.1: for two classes
    (TP/P + TN/N) / 2); classes absent from ``labels`` are skipped.

    Examples:
        >>> balanced_accuracy(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1]))  # recalls 1 and 1/2
        0.75
    """
    if predictions.shape != labels.shape:
        raise ValueError(f"balanced_accuracy: predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)}")
    recalls = [(predictions[labels == c] == c).double().mean() for c in torch.unique(labels)]
    return torch.stack(recalls).mean().item()


def core_balanced_accuracy(predictions: Tensor, labels: Tensor, groups: Tensor) -> float:
    """Balanced accuracy per tissue core (thesis Fig. 7.5, "core level"): each group's prediction is the majority
    of its spots' predicted labels (ties: the smallest class) and its label the majority of its spots' labels.

    Examples:
        >>> predictions, labels = torch.tensor([0, 0, 1, 1, 1, 0]), torch.tensor([0, 0, 0, 1, 1, 1])
        >>> core_balanced_accuracy(predictions, labels, torch.tensor([0, 0, 0, 1, 1, 1]))  # 2 of 3 per core
        1.0
    """
    if not predictions.shape == labels.shape == groups.shape:
        raise ValueError("core_balanced_accuracy: predictions, labels and groups need one shape")
    core_predictions, core_labels = [], []
    for group in torch.unique(groups):
        members = groups == group
        core_predictions.append(torch.bincount(predictions[members]).argmax())
        core_labels.append(torch.bincount(labels[members]).argmax())
    return balanced_accuracy(torch.stack(core_predictions), torch.stack(core_labels))


class BitsPerDim(nn.Module):
    r"""Maximum likelihood: the batch's mean -log p(x) / (d ln 2) (thesis Eq. 5.3).

    Arguments:
        flow: The :class:`~invertnet.models.FlowDistribution` trained; batches are tensors (B, ...).
    """

    name = "bits_per_dim"

    def __init__(self, flow: FlowDistribution) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, batch: Tensor) -> Tensor:
        return self.flow.bits_per_dim(batch).mean()

    def evaluate(self, data: Tensor, batch_size: int = 256) -> dict[str, float]:
        """Mean bits/dim over ``data`` and its standard error over samples."""
        return mean_and_standard_error(bits_per_sample(self.flow, data, batch_size))


class ConditionalBitsPerDim(nn.Module):
    r"""Maximum likelihood of a conditional flow given class labels: the batch's mean -log p(x | c) / (d ln 2),
    c the one-hot code of the label.

    Arguments:
        flow: A conditional :class:`~invertnet.models.FlowDistribution` with ``n_classes`` context features;
            batches are ``(x, labels)``.
        n_classes: Number of classes (the context size).
    """

    name = "bits_per_dim"

    def __init__(self, flow: FlowDistribution, n_classes: int) -> None:
        super().__init__()
        self.flow, self.n_classes = flow, n_classes

    def context(self, labels: Tensor) -> Tensor:
        """One-hot codes (B, n_classes) of labels (B,), in the flow's dtype."""
        dtype = next(self.flow.parameters()).dtype
        return F.one_hot(labels.long(), self.n_classes).to(dtype)

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, labels = batch
        return self.flow.bits_per_dim(x, context=self.context(labels)).mean()

    @torch.no_grad()
    def evaluate(self, data: tuple[Tensor, Tensor], batch_size: int = 256) -> dict[str, float]:
        """Mean bits/dim given the labels over ``data`` and its standard error over samples."""
        x, labels = data
        bits = torch.cat(
            [
                self.flow.bits_per_dim(chunk, context=self.context(given))
                for chunk, given in zip(x.split(batch_size), labels.split(batch_size), strict=True)
            ]
        )
        return mean_and_standard_error(bits)


def random_shift(inputs: Tensor, max_shift: int, fill: float | Tensor) -> Tensor:
    """Each sample translated by its own random offsets in [-max_shift, max_shift] along every spatial dimension
    (images (B, C, H, W), signals (B, C, L)), the uncovered border filled with ``fill`` (a number or a 0-d
    tensor, read without a host synchronisation) (thesis A.1: shifts of up to two pixels)."""
    if max_shift <= 0:
        return inputs
    if inputs.dim() not in (3, 4):
        raise ValueError(f"random_shift: expected (B, C, L) or (B, C, H, W), got {tuple(inputs.shape)}")
    spatial = inputs.shape[2:]
    pad = (max_shift,) * (2 * len(spatial))
    inside = F.pad(torch.ones_like(inputs[:1, :1], dtype=torch.bool), pad)
    fill = torch.as_tensor(fill, dtype=inputs.dtype, device=inputs.device)
    shifted = torch.where(inside, F.pad(inputs, pad), fill)
    batch = inputs.shape[0]
    for axis, size in enumerate(spatial):
        dimension = 2 + axis
        offsets = torch.randint(0, 2 * max_shift + 1, (batch,), device=inputs.device)
        index = offsets[:, None] + torch.arange(size, device=inputs.device)  # (B, size): the kept window
        view = [batch] + [1] * (shifted.dim() - 1)
        view[dimension] = size
        target = list(shifted.shape)
        target[dimension] = size
        shifted = shifted.gather(dimension, index.view(view).expand(target))
    return shifted


def random_flip(images: Tensor) -> Tensor:
    """Each sample mirrored along its last (width) dimension with probability 1/2 (random horizontal flips,
    Behrmann et al. 2019, appendix C.2, for CIFAR)."""
    flipped = torch.rand(images.shape[0], *([1] * (images.dim() - 1)), device=images.device) < 0.5
    return torch.where(flipped, images.flip(-1), images)


def augment(images: Tensor, max_shift: int, flip: bool) -> Tensor:
    """Training-time augmentation of inputs (B, C, ...): random translations of up to ``max_shift`` pixels, the
    border filled with the batch's smallest value (thesis A.1), then random horizontal flips if ``flip``."""
    if max_shift:
        images = random_shift(images, max_shift, images.amin())
    if flip:
        images = random_flip(images)
    return images


class CrossEntropy(nn.Module):
    r"""Classification: the batch's mean cross-entropy of ``classifier(x)`` against labels y.

    Arguments:
        classifier: A module mapping (B, ...) inputs to (B, n_classes) logits; batches are ``(x, y)``.
        max_shift: Data augmentation in training mode: random translations of up to this many pixels
            (thesis A.1), the border filled with the batch's smallest value (the background).
        flip: Data augmentation in training mode: random horizontal flips (Behrmann et al. 2019, C.2: CIFAR).
    """

    name = "cross_entropy"

    def __init__(self, classifier: nn.Module, max_shift: int = 0, flip: bool = False) -> None:
        super().__init__()
        self.classifier, self.max_shift, self.flip = classifier, max_shift, flip

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        if self.training:
            x = augment(x, self.max_shift, self.flip)
        return F.cross_entropy(self.classifier(x), y)

    @torch.no_grad()
    def evaluate(self, data: tuple[Tensor, Tensor], batch_size: int = 256) -> dict[str, float]:
        """Mean cross-entropy and accuracy over ``data``, with the binomial standard error of the accuracy."""
        x, y = data
        logits = torch.cat([self.classifier(chunk) for chunk in x.split(batch_size)])
        correct = (logits.argmax(dim=1) == y).double()
        accuracy = correct.mean().item()
        return {
            "cross_entropy": F.cross_entropy(logits, y).item(),
            "accuracy": accuracy,
            "accuracy_standard_error": math.sqrt(accuracy * (1 - accuracy) / len(y)),
        }


class AdversarialLoss(nn.Module):
    r"""The non-saturating GAN objective as one scalar whose gradient trains both players in one step.

    .. math:: L = \underbrace{-\log D(x, c) - \log(1 - D(G(z, c), c))}_{\text{discriminator}}
        \; \underbrace{- \log D_{\bar\theta}(G(z, c), c)}_{\text{generator}}

    The discriminator term sees detached fakes, and the generator term evaluates the discriminator with
    detached parameters (``torch.func.functional_call``), so the discriminator's parameters receive only the
    gradient of their own loss and the generator's only of theirs: one optimiser step is a simultaneous
    gradient step of the min-max game. Batches are ``(images, labels)``.

    Arguments:
        gan: The :class:`~invertnet.models.ConditionalGAN`.
    """

    name = "gan_loss"

    def __init__(self, gan: ConditionalGAN) -> None:
        super().__init__()
        self.gan = gan

    def _losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        discriminator = self.gan.discriminator
        fake = self.gan.sample(labels)
        real_logits = discriminator(images, labels)
        fake_logits = discriminator(fake.detach(), labels)
        d_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        d_loss = d_loss + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        frozen = {name: value.detach() for name, value in discriminator.named_parameters()}
        fooled = functional_call(discriminator, frozen, (fake, labels))
        g_loss = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
        return d_loss, g_loss

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        d_loss, g_loss = self._losses(*batch)
        return d_loss + g_loss

    @torch.no_grad()
    def evaluate(self, data: tuple[Tensor, Tensor], batch_size: int = 256) -> dict[str, float]:
        """Discriminator and generator losses on held-out real images (eval mode), and the discriminator's
        accuracy at telling them from fresh fakes."""
        images, labels = data
        d_total = g_total = correct = 0.0
        for chunk, chunk_labels in zip(images.split(batch_size), labels.split(batch_size), strict=True):
            d_loss, g_loss = self._losses(chunk, chunk_labels)
            d_total += d_loss.item() * len(chunk)
            g_total += g_loss.item() * len(chunk)
            fake = self.gan.sample(chunk_labels)
            correct += (self.gan.discriminator(chunk, chunk_labels) > 0).sum().item()
            correct += (self.gan.discriminator(fake, chunk_labels) <= 0).sum().item()
        n = len(images)
        return {
            "discriminator_loss": d_total / n,
            "generator_loss": g_total / n,
            "discriminator_accuracy": correct / (2 * n),
        }


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
    r"""The independence cross-entropy (Jacobsen, Behrmann, Zemel and Bethge, ICLR 2019; Behrmann's thesis,
    Definition 6.14) with the likelihood term of the thesis' Eq. 6.13, as one scalar for simultaneous training
    of the bijection and the nuisance classifier.

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
    no information about a balanced label. (The thesis' Remark 6.20 finds a bounded divergence "not necessary"
    for its objective and names one as future work; the confusion term is this library's choice, measured.)
    The likelihood term makes z_s and z_n independent (Lemma 6.19) and keeps z_n where the prior puts it; its
    log-determinant is the body's own (power series and Hutchinson for i-ResNet blocks, thesis 5.1). It is
    divided by d (per input dimension, like bits/dim), where Eq. 6.13 adds L_MLEn unscaled: Eq. 6.13 as written
    is ``likelihood_weight = d``.

    The returned loss is semantic + adversary + lambda nuisance + mu nuisance_nll (see
    :class:`IndependenceLosses`): the nuisance classifier's parameters receive only the gradient of its own
    cross-entropy and the bijection's and prior's only that of the objective above
    (``torch.func.functional_call``), so one optimiser step is a simultaneous gradient step of the game.
    Batches are ``(x, y)``; pass this module to :func:`~invertnet.training.fit`, or as the trainer's model (it
    holds both players' parameters) and as its objective. Whether z_n really hides y is for a fresh classifier
    to tell: :func:`~invertnet.analysis.nuisance_probe`.

    Arguments:
        classifier: The :class:`~invertnet.models.FullyInvertibleClassifier`; give it dense blocks
            (``fully_invertible_classifier(dense_blocks=...)``) so that the label can leave every z_n entry.
        nuisance_features: d - C, the number of nuisance variables.
        nuisance_classifier: A module mapping z_n (B, d - C) to logits (B, C); by default an MLP with one
            hidden layer of ``hidden`` units.
        nuisance_weight: lambda (1 in Def. 6.14).
        likelihood_weight: mu, the weight of the per-dimension likelihood term (Eq. 6.13 as written: mu = d;
            0 for Def. 6.14 alone).
        nuisance_objective: ``"confusion"`` (default) or ``"cross_entropy"`` (Def. 6.14 as written).
        max_shift, flip: Data augmentation of x in training mode, as :class:`CrossEntropy`'s.

    Examples:
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
        max_shift: int = 0,
        flip: bool = False,
    ) -> None:
        super().__init__()
        if max_shift < 0:
            raise ValueError(f"IndependenceCrossEntropy: max_shift must be >= 0, got {max_shift}")
        self.max_shift, self.flip = max_shift, flip
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
        x, y = batch
        if self.training:
            x = augment(x, self.max_shift, self.flip)
        terms = self.losses(x, y)
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
