r"""Thesis Fig. 6.5 made measurable: a fully invertible classifier trained with cross-entropy against the same
network trained with the independence cross-entropy (Def. 6.14, Eq. 6.13), compared by a fresh probe of the
nuisance variables and by what an independent judge sees in their metameric samples (Def. 6.8)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from invertnet.analysis.invariance import metameric_sample, nuisance_probe
from invertnet.data import DIGITS_LEVELS, centered_levels, load_digits
from invertnet.figures import save_figure, subplots
from invertnet.layers import refine_spectral_norms
from invertnet.models.classifiers import FullyInvertibleClassifier, fully_invertible_classifier
from invertnet.training import CrossEntropy, IndependenceCrossEntropy, fit

__all__ = ["independence_study", "partners_of_other_classes"]


def partners_of_other_classes(labels: Tensor, generator: torch.Generator) -> Tensor:
    """For every sample i a random index j with labels[j] != labels[i], shape (N,)."""
    partners = torch.empty_like(labels)
    for index, label in enumerate(labels.tolist()):
        others = (labels != label).nonzero().flatten()
        if not len(others):
            raise ValueError("partners_of_other_classes: every label is the same")
        partners[index] = others[torch.randint(0, len(others), (1,), generator=generator)]
    return partners


def _judge(train: tuple[Tensor, Tensor], steps: int) -> nn.Module:
    """An ordinary CNN (not invertible, trained apart) that says which digit an image shows."""
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )
    fit(CrossEntropy(net), train, steps=steps, lr=3e-3, schedule="cosine")
    return net.eval()


def independence_study(
    output_dir: str | Path,
    steps: int = 800,
    n_pairs: int = 200,
    dense_blocks: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Train two fully invertible digit classifiers alike (4 + 4 convolutional blocks, ``dense_blocks`` dense
    ones), one with cross-entropy and one with the independence cross-entropy, then for each: test accuracy,
    a fresh nuisance probe (:func:`~invertnet.analysis.nuisance_probe`: accuracy and the Lemma 6.15 bound on
    I(Y; Z_n)), and metameric samples of ``n_pairs`` test pairs of different classes (logits of x, nuisance of
    the reference) judged by an independent CNN: the fraction it assigns to x's class (the logits' class; what
    a classifier without excessive invariance should give) and to the reference's class (the invariance-based
    adversarial examples of Def. 6.3), and the same along the interpolation of the nuisance from x's to the
    reference's (thesis Fig. 6.5, :data:`FRACTIONS`). Saves ``independence.png`` (the swaps) and
    ``interpolation.png`` (the interpolations, as in Fig. 6.5)."""
    (x_train, y_train), (x_test, y_test) = load_digits("train"), load_digits("test")
    train = (centered_levels(x_train, DIGITS_LEVELS), y_train)
    test = (centered_levels(x_test, DIGITS_LEVELS), y_test)
    torch.manual_seed(seed)
    judge = _judge(train, steps)
    with torch.no_grad():
        judge_accuracy = (judge(test[0]).argmax(1) == test[1]).double().mean().item()
    generator = torch.Generator().manual_seed(seed)
    x, labels = test[0][:n_pairs], test[1][:n_pairs]
    partners = partners_of_other_classes(labels, generator)
    reference, reference_labels = x[partners], labels[partners]
    report: dict[str, Any] = {"judge_test_accuracy": judge_accuracy, "pairs": len(x)}
    samples: dict[str, Tensor] = {}
    paths: dict[str, list[Tensor]] = {}
    for name in ("cross_entropy", "independence"):
        torch.manual_seed(seed)
        model = fully_invertible_classifier((1, 8, 8), 10, 4, 32, 2, 0.9, dense_blocks=dense_blocks)
        independent = name == "independence"
        objective = IndependenceCrossEntropy(model, 64 - 10) if independent else CrossEntropy(model)
        fit(objective, train, steps=steps, lr=3e-3, schedule="cosine", seed=seed)
        refine_spectral_norms(model)
        model.eval()
        double = copy.deepcopy(model).double()  # one copy: its layers' certified bounds are computed once
        samples[name] = _metameric(double, x, reference)
        paths[name] = [_metameric(double, x[:4], reference[:4], fraction) for fraction in FRACTIONS]
        with torch.no_grad():
            accuracy = (model(test[0]).argmax(1) == test[1]).double().mean().item()
            judged = judge(samples[name]).argmax(1)
            along = [judge(_metameric(double, x, reference, fraction)).argmax(1) for fraction in FRACTIONS]
        report[name] = {
            "test_accuracy": accuracy,
            **nuisance_probe(model, train, test, seed=seed),
            "metameric_judged_as_logits_class": (judged == labels).double().mean().item(),
            "metameric_judged_as_reference_class": (judged == reference_labels).double().mean().item(),
            "interpolation_judged_as_logits_class": {
                f"{fraction:.2f}": (classes == labels).double().mean().item()
                for fraction, classes in zip(FRACTIONS, along, strict=True)
            },
        }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report["figure"] = str(_plot(x, reference, samples, output_dir / "independence.png"))
    report["interpolation_figure"] = str(_plot_interpolation(reference[:4], paths, output_dir / "interpolation.png"))
    return report


#: The shares t of the reference's nuisance along the interpolation of thesis Fig. 6.5.
FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _metameric(double: FullyInvertibleClassifier, x: Tensor, reference: Tensor, fraction: float = 1.0) -> Tensor:
    """Metameric samples of a float64 model (the inverse to 1e-12), returned in float32."""
    return metameric_sample(double, x.double(), reference.double(), fraction).float()


def _plot_interpolation(reference: Tensor, paths: dict[str, list[Tensor]], path: Path) -> Path:
    """Thesis Fig. 6.5: for each model, columns of samples F^{-1}(z_s, (1 - t) z_n + t z*_n) as t goes from 0
    (the image, top) to 1 (the target's nuisance), one column per pair, the targets in the last row."""
    pairs = len(reference)
    columns = 2 * pairs + 1
    figure, axes = subplots(
        len(FRACTIONS) + 1,
        columns,
        figsize=(columns * 0.9, (len(FRACTIONS) + 1) * 0.95),
        squeeze=False,
        feature="independence_study",
    )
    for block, name in enumerate(("cross_entropy", "independence")):
        for step, images in enumerate(paths[name]):
            for pair in range(pairs):
                axes[step][block * (pairs + 1) + pair].imshow(images[pair, 0].numpy(), cmap="gray", vmin=-0.5, vmax=0.5)
        for pair in range(pairs):
            axes[-1][block * (pairs + 1) + pair].imshow(reference[pair, 0].numpy(), cmap="gray", vmin=-0.5, vmax=0.5)
        axes[0][block * (pairs + 1)].set_title("CE" if name == "cross_entropy" else "iCE", fontsize=8, loc="left")
    for axis in axes.flat:
        axis.axis("off")
    for step, fraction in enumerate(FRACTIONS):
        axes[step][pairs].text(0.5, 0.5, f"t = {fraction:.1f}", ha="center", va="center", fontsize=7)
    axes[-1][pairs].text(0.5, 0.5, "target", ha="center", va="center", fontsize=7)
    return save_figure(figure, path)


def _plot(x: Tensor, reference: Tensor, samples: dict[str, Tensor], path: Path) -> Path:
    columns = min(12, len(x))
    rows = [
        ("logits from", x),
        ("nuisance from", reference),
        ("metameric, CE", samples["cross_entropy"]),
        ("metameric, iCE", samples["independence"]),
    ]
    figure, axes = subplots(
        len(rows), columns, figsize=(columns * 0.9, len(rows) * 1.05), squeeze=False, feature="independence_study"
    )
    for row, (title, images) in enumerate(rows):
        for column in range(columns):
            axes[row][column].imshow(images[column, 0].numpy(), cmap="gray", vmin=-0.5, vmax=0.5)
            axes[row][column].axis("off")
        axes[row][0].set_title(title, fontsize=7, loc="left")
    return save_figure(figure, path)
