r"""Adversarial spheres (thesis Examples 6.5, 6.6; Fig. 6.3): a classifier that ignores n of d dimensions, and
the analytic perturbation- and invariance-based attacks that stay on the data manifold.

Points lie on two concentric spheres, |x| = R1 (inner, label -1) or R2 (outer, +1). The mis-aligned classifier
D(x) = sign(|x_{1..d-n}| - b) reads only the first d - n coordinates, with b the max-margin threshold on the
training set. The *perturbation attack* flips D while staying on the point's own sphere (shrink the used
coordinates below b, grow the unused ones back to the radius): possible from the outer sphere only. The
*invariance attack* keeps D while moving the point to the other sphere (rescale only the unused coordinates):
possible from the inner sphere only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from invertnet.figures import save_figure, subplots

__all__ = [
    "AttackResult",
    "MisalignedSphereClassifier",
    "accuracy_under_attack",
    "invariance_attack",
    "perturbation_attack",
    "plot_sphere_attacks",
    "sample_spheres",
]


def sample_spheres(n: int, d: int, radii: tuple[float, float], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n points uniformly on the sphere of radius R1 (label -1) or R2 (label +1) in R^d, half each."""
    labels = torch.where(torch.arange(n) % 2 == 0, -1, 1)
    directions = torch.randn(n, d, generator=generator, dtype=torch.float64)
    radius = torch.where(labels < 0, radii[0], radii[1]).double()
    return directions / directions.norm(dim=1, keepdim=True) * radius[:, None], labels


class MisalignedSphereClassifier:
    """D(x) = sign(|x_{1..d-n}| - b) with b the max-margin threshold between the two spheres' training points
    (thesis Example 6.6).

    Arguments:
        n_unused: n, the trailing coordinates the classifier ignores.
    """

    def __init__(self, n_unused: int) -> None:
        self.n_unused = n_unused
        self.bias = float("nan")

    def used_norm(self, x: Tensor) -> Tensor:
        return x[:, : x.shape[1] - self.n_unused].norm(dim=1)

    def fit(self, x: Tensor, labels: Tensor) -> MisalignedSphereClassifier:
        """b = (l + u) / 2 with l the largest used norm of the inner sphere and u the smallest of the outer."""
        norms = self.used_norm(x)
        low, high = norms[labels < 0].max().item(), norms[labels > 0].min().item()
        if low > high:
            raise ValueError(f"MisalignedSphereClassifier: the training set is not separable ({low:.4f} > {high:.4f})")
        self.bias = (low + high) / 2
        return self

    def __call__(self, x: Tensor) -> Tensor:
        return torch.where(self.used_norm(x) > self.bias, 1, -1)


@dataclass
class AttackResult:
    """Adversarial points, which of them are valid adversarial examples, and the perturbation norms."""

    x: Tensor
    success: Tensor
    distance: Tensor


def _with_norms(x: Tensor, n_unused: int, used: Tensor, unused: Tensor) -> tuple[Tensor, Tensor]:
    """x with its used / unused blocks rescaled to the given norms; also whether that was possible."""
    split = x.shape[1] - n_unused
    head, tail = x[:, :split], x[:, split:]
    head_norm, tail_norm = head.norm(dim=1, keepdim=True), tail.norm(dim=1, keepdim=True)
    feasible = (unused >= 0) & (used >= 0) & ((tail_norm[:, 0] > 0) | (unused == 0))
    head = head * (used[:, None] / head_norm.clamp_min(1e-300))
    tail = tail * (unused.clamp_min(0)[:, None] / tail_norm.clamp_min(1e-300))
    return torch.cat([head, tail], dim=1), feasible


def perturbation_attack(
    classifier: MisalignedSphereClassifier, x: Tensor, radii: tuple[float, float], margin: float = 1e-6
) -> AttackResult:
    """Flip D while staying on the point's own sphere (Example 6.6, perturbation-based): used norm to just
    across b, unused coordinates rescaled so that |x*| = |x|. Succeeds where that is possible and flips D."""
    radius = x.norm(dim=1)
    decision = classifier(x)
    target = torch.where(decision > 0, classifier.bias * (1 - margin), classifier.bias * (1 + margin)).double()
    unused_sq = radius**2 - target**2
    attacked, feasible = _with_norms(x, classifier.n_unused, target, unused_sq.clamp_min(0).sqrt())
    feasible &= unused_sq >= 0
    success = feasible & (classifier(attacked) != decision) & torch.isclose(attacked.norm(dim=1), radius)
    return AttackResult(torch.where(success[:, None], attacked, x), success, (attacked - x).norm(dim=1) * success)


def invariance_attack(classifier: MisalignedSphereClassifier, x: Tensor, radii: tuple[float, float]) -> AttackResult:
    """Keep D while moving the point to the other sphere (Example 6.6, invariance-based): used coordinates fixed,
    unused ones rescaled so that |x*| is the other radius. Succeeds where that is possible and D stays."""
    inner = x.norm(dim=1) < (radii[0] + radii[1]) / 2
    other = torch.where(inner, radii[1], radii[0]).double()
    used = classifier.used_norm(x)
    unused_sq = other**2 - used**2
    attacked, feasible = _with_norms(x, classifier.n_unused, used, unused_sq.clamp_min(0).sqrt())
    feasible &= unused_sq >= 0
    success = feasible & (classifier(attacked) == classifier(x)) & torch.isclose(attacked.norm(dim=1), other)
    return AttackResult(torch.where(success[:, None], attacked, x), success, (attacked - x).norm(dim=1) * success)


def accuracy_under_attack(attack: AttackResult, budgets: Tensor) -> Tensor:
    """Accuracy against an attacker whose perturbation norm is at most each budget (Fig. 6.3): the points whose
    successful attack needs more than the budget stay classified correctly."""
    broken = attack.success[None, :] & (attack.distance[None, :] <= budgets[:, None])
    return 1 - broken.double().mean(dim=1)


def plot_sphere_attacks(curves: dict[str, tuple[Tensor, Tensor]], path: str | Path) -> Path:
    """Accuracy against the perturbation budget, one curve per (attack, sphere) (thesis Fig. 6.3).

    Arguments:
        curves: ``label -> (budgets, accuracy)``, two tensors of shape (K,) each, e.g. from
            :func:`accuracy_under_attack`.
        path: The image file to write.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'invertnet[plots]'``).
    """
    figure, axis = subplots(figsize=(6, 4), feature="plot_sphere_attacks")
    for label, (budgets, accuracy) in curves.items():
        axis.plot(budgets.numpy(), accuracy.numpy(), label=label)
    axis.set(xlabel="l2 bound on the perturbation", ylabel="accuracy", ylim=(-0.02, 1.02), title="adversarial spheres")
    axis.legend(fontsize=8)
    return save_figure(figure, path)
