r"""Invariance of invertible classifiers (Behrmann's thesis, ch. 6): metameric sampling (Definition 6.8) and a
fresh probe of the nuisance variables (Lemma 6.15); the independence cross-entropy that trains them is
:class:`~invertnet.training.IndependenceCrossEntropy`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertnet.models.classifiers import FullyInvertibleClassifier
from invertnet.training.loop import fit
from invertnet.training.objectives import CrossEntropy

__all__ = ["metameric_sample", "nuisance_probe"]


@torch.no_grad()
def metameric_sample(
    model: FullyInvertibleClassifier,
    x: Tensor,
    x_reference: Tensor,
    fraction: float = 1.0,
    **solver_options: object,
) -> Tensor:
    r"""x_met = F^{-1}(z_s, z~_n): the logits of x with the nuisance variables of x_reference (thesis Def. 6.8),
    or, with ``fraction`` t in [0, 1], with the nuisance z~_n = (1 - t) z_n + t z*_n interpolated linearly from
    x's own (t = 0: x itself) to the reference's (t = 1), as in thesis Fig. 6.5 (Jacobsen et al. 2019).

    The classifier cannot tell x_met from x (their logits agree up to the inverse's tolerance), while x_met
    carries everything else of the reference; if x_met looks like the reference, the classifier is invariant
    to the change from x to x_met (an invariance-based adversarial example, Definition 6.3).

    Arguments:
        model: A :class:`~invertnet.models.FullyInvertibleClassifier`, in eval mode.
        x: Inputs (B, ...) whose logits are kept.
        x_reference: Inputs (B, ...) whose nuisance variables are kept.
        fraction: t, the share of the reference's nuisance.
        **solver_options: ``atol``, ``rtol``, ``max_iter``, ``strict`` of the inverse.
    """
    if x.shape != x_reference.shape:
        raise ValueError(f"metameric_sample: x {tuple(x.shape)} and x_reference {tuple(x_reference.shape)} differ")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"metameric_sample: fraction must lie in [0, 1], got {fraction}")
    z, z_reference = model.features(x), model.features(x_reference)
    semantic, own = model.split(z)
    _, nuisance = model.split(z_reference)
    mixed = nuisance if fraction == 1.0 else (1.0 - fraction) * own + fraction * nuisance
    return model.invert_features(model.merge(semantic, mixed, z), **solver_options)


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

    Trains an MLP (one hidden layer of ``hidden`` ELU units) with :func:`~invertnet.training.fit` (Adam,
    batches in a ``seed``-determined order) on the standardised, frozen z_n of ``train`` and evaluates it on
    ``test``. Its test cross-entropy gives the variational lower bound of Lemma 6.15 (Barber and Agakov, 2003),
    I(Y; Z_n) >= H(Y) - CE, in nats with H(Y) the entropy of the test labels; an accuracy at ``chance`` (the
    most frequent test class) means z_n holds no label information this probe can use. Unlike the co-trained
    nuisance classifier of :class:`~invertnet.training.IndependenceCrossEntropy`, the probe never played the
    game, so the bijection cannot have fooled it.

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
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = nn.Sequential(nn.Linear(z_train.shape[1], hidden), nn.ELU(), nn.Linear(hidden, n_classes))
    probe = probe.to(device=z_train.device, dtype=z_train.dtype)
    mean, scale = z_train.mean(0), z_train.std(0).clamp_min(1e-12)  # the probe sees standardised z_n
    standardised = ((z_train - mean) / scale, train[1])
    fit(CrossEntropy(probe), standardised, steps=steps, batch_size=min(batch_size, len(z_train)), lr=lr, seed=seed)
    with torch.no_grad():
        logits = probe.eval()((z_test - mean) / scale)
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
