r"""The invertibility experiments of the thesis: the two-circles picture of Fig. 3.1 (preimages and condition
numbers of a tiny ReLU network over the input plane) and vanilla ResNets against i-ResNets (Behrmann et al. 2019,
appendix B: are the residual blocks of a trained network invertible, and do inputs come back?)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from invertnet.analysis.certificates import certify
from invertnet.analysis.preimages import relu_preimage
from invertnet.analysis.spheres import (
    MisalignedSphereClassifier,
    accuracy_under_attack,
    invariance_attack,
    perturbation_attack,
    plot_sphere_attacks,
    sample_spheres,
)
from invertnet.analysis.stability import layer_spectra, plot_layer_spectra
from invertnet.core import InvertibleSequential
from invertnet.data import DIGITS_LEVELS, centered_levels, load_digits
from invertnet.figures import save_figure, subplots
from invertnet.layers import InvertibleResidual, LipschitzMLP, refine_spectral_norms
from invertnet.training import CrossEntropy, fit

__all__ = [
    "TABLE_3_1",
    "cifar_spectra_study",
    "cnn_spectra_study",
    "reconstruction_study",
    "spheres_study",
    "table_3_1_cnn",
    "two_circles",
    "two_circles_study",
    "vanilla_vs_iresnet",
]

_KINDS = ("unbounded", "polytope", "point")


def two_circles(n: int, generator: torch.Generator, noise: float = 0.08) -> tuple[Tensor, Tensor]:
    """n points on two noisy concentric circles (radii 0.5 and 1) and their labels 0 / 1."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    angles = 2 * math.pi * torch.rand(n, generator=generator)
    radii = 0.5 + 0.5 * labels.double() + noise * torch.randn(n, generator=generator, dtype=torch.float64)
    return torch.stack([radii * angles.cos(), radii * angles.sin()], dim=1), labels


def two_circles_study(output_dir: str | Path, resolution: int = 40, steps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Thesis Fig. 3.1: a ReLU network with one hidden layer of 3 units trained on two circles; over a grid of
    inputs, the class, the kind of preimage of the first layer's activations (Theorem 3.3) and the condition
    number of the first layer's linearisation. Saves ``two_circles.png``; returns the kinds' frequencies."""
    generator = torch.Generator().manual_seed(seed)
    x, y = two_circles(1000, generator)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    fit(CrossEntropy(net), (x, y), steps=steps, batch_size=len(x), lr=0.02)  # full batch
    net.eval()
    accuracy = (net(x).argmax(1) == y).double().mean().item()
    axis = torch.linspace(-1.5, 1.5, resolution, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)[:, [1, 0]]  # row-major over (x2, x1)
    weight, bias = net[0].weight.detach(), net[0].bias.detach()
    kinds, conditions = [], []
    with torch.no_grad():
        prediction = net(grid).argmax(1).view(resolution, resolution)
        for point in grid:
            activation = torch.relu(weight @ point + bias)
            kinds.append(_KINDS.index(relu_preimage(weight, bias, activation).kind))
            active = weight[activation > 0]
            values = torch.linalg.svdvals(active) if len(active) else torch.zeros(0, dtype=torch.float64)
            values = values[values > 1e-12]
            conditions.append((values[0] / values[-1]).item() if len(values) == 2 else 0.0)  # 0: rank deficient
    kind_map = torch.tensor(kinds).view(resolution, resolution)
    condition_map = torch.tensor(conditions).view(resolution, resolution)
    figure, axes = subplots(1, 3, figsize=(15, 4.5), feature="two_circles_study")
    extent = (-1.5, 1.5, -1.5, 1.5)
    axes[0].imshow(prediction.numpy(), origin="lower", extent=extent, cmap="coolwarm", alpha=0.6)
    axes[0].scatter(x[:300, 0], x[:300, 1], c=y[:300], s=4, cmap="coolwarm")
    axes[0].set_title(f"prediction (train accuracy {accuracy:.2f})")
    image = axes[1].imshow(kind_map.numpy(), origin="lower", extent=extent, cmap="viridis", vmin=0, vmax=2)
    colourbar = figure.colorbar(image, ax=axes[1], ticks=[0, 1, 2])
    colourbar.ax.set_yticklabels(["infinite", "finite", "single point"])
    axes[1].set_title("preimage of the first layer's output")
    image = axes[2].imshow(condition_map.numpy(), origin="lower", extent=extent, cmap="magma")
    figure.colorbar(image, ax=axes[2], label="condition number (0: rank deficient)")
    axes[2].set_title("condition of the first layer's linearisation")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_figure(figure, output_dir / "two_circles.png")
    counts = torch.bincount(kind_map.flatten(), minlength=3).double() / kind_map.numel()
    singletons = kind_map == 2
    return {
        "figure": str(output_dir / "two_circles.png"),
        "train_accuracy": accuracy,
        "preimage_fractions": dict(zip(_KINDS, counts.tolist(), strict=True)),
        "median_condition_where_single_point": condition_map[singletons].median().item() if singletons.any() else None,
    }


def _residual_classifier(constrained: bool, width: int, n_blocks: int, coeff: float) -> nn.Module:
    blocks = []
    for _ in range(n_blocks):
        if constrained:
            branch: nn.Module = LipschitzMLP(64, width, n_layers=2, coeff=coeff)
        else:
            branch = nn.Sequential(nn.Linear(64, width), nn.ELU(), nn.Linear(width, 64))
        blocks.append(InvertibleResidual(branch, max_iter=500))
    return nn.ModuleDict({"body": InvertibleSequential(*blocks), "head": nn.Linear(64, 10)})


def vanilla_vs_iresnet(
    steps: int = 600, n_blocks: int = 4, width: int = 128, coeff: float = 0.9, seed: int = 0
) -> dict[str, Any]:
    """Behrmann et al. 2019, appendix B: residual classifiers on digits (flattened, scaled to [0, 1]) with plain
    branches and with spectrally normalised ones (``coeff``), trained alike; then the certificate of every block,
    the test accuracy, and the reconstruction of test inputs from the last features through the fixed-point
    inverse."""
    (x_train, y_train), (x_test, y_test) = load_digits("train"), load_digits("test")
    x_train, x_test = x_train.flatten(1) / (DIGITS_LEVELS - 1), x_test.flatten(1) / (DIGITS_LEVELS - 1)
    report: dict[str, Any] = {}
    for name, constrained in (("vanilla", False), ("i-resnet", True)):
        torch.manual_seed(seed)
        model = _residual_classifier(constrained, width, n_blocks, coeff)
        classifier = nn.Sequential(model["body"], model["head"])
        fit(CrossEntropy(classifier), (x_train, y_train), steps=steps, lr=1e-3, seed=seed)
        refine_spectral_norms(model)
        model.eval()
        with torch.no_grad():
            accuracy = (model["head"](model["body"](x_test)).argmax(1) == y_test).double().mean().item()
            features = model["body"](x_test)
            record = model["body"].inverse_result(features)
        certificate = certify(model["body"], x_test[:16])
        report[name] = {
            "test_accuracy": accuracy,
            "certified": certificate.certified,
            "lipschitz_bounds": [block.lipschitz_upper for block in certificate.blocks],
            "reconstruction_max_abs_error": (record.value - x_test).abs().max().item(),
            "inverse_status": record.status.name.lower(),
            "inverse_iterations": record.iterations,
        }
    return report


def cnn_spectra_study(output_dir: str | Path, steps: int = 400, seed: int = 0) -> dict[str, Any]:
    """Thesis Fig. 3.4: a ReLU CNN (three 3x3 convolutions with 8, 16, 16 channels, the last two with stride 2,
    then a linear read-out) trained on digits; the singular values of every prefix Jacobian at a test digit.
    Saves ``layer_spectra.png``; returns each prefix's rank and condition number."""
    (x_train, y_train), (x_test, _) = load_digits("train"), load_digits("test")
    x_train, x_test = x_train / (DIGITS_LEVELS - 1), x_test / (DIGITS_LEVELS - 1)
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    fit(CrossEntropy(net), (x_train, y_train), steps=steps, lr=3e-3, seed=seed)
    spectra = layer_spectra(net, x_test[0])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figure = plot_layer_spectra(spectra, output_dir / "layer_spectra.png", "ReLU CNN on digits: prefix Jacobians")
    return {
        "figure": str(figure),
        "layers": [{"layer": s.name, "rank": s.rank, "condition_number": s.condition_number} for s in spectra],
    }


TABLE_3_1 = ((32, 32, 1), (64, 32, 2), (64, 16, 1), (32, 16, 1), (32, 16, 1), (64, 32, 2))
"""Thesis Table 3.1: (feature maps of WideCIFAR, of ThinCIFAR, stride) of the six 3x3 convolutions."""


def table_3_1_cnn(variant: str, n_classes: int = 10) -> nn.Sequential:
    """WideCIFAR or ThinCIFAR of thesis Table 3.1 for 3 x 32 x 32 inputs: six 3x3 convolutions ("same" padding,
    strides 1, 2, 1, 1, 1, 2; no pooling, residual connections or normalisation), each followed by ReLU, then a
    dense layer of 512 units with ReLU and a dense read-out of ``n_classes`` (softmax in the loss)."""
    if variant not in ("wide", "thin"):
        raise ValueError(f"table_3_1_cnn: variant must be 'wide' or 'thin', got {variant!r}")
    layers: list[nn.Module] = []
    channels, size = 3, 32
    for wide, thin, stride in TABLE_3_1:
        out = wide if variant == "wide" else thin
        layers += [nn.Conv2d(channels, out, 3, stride=stride, padding=1), nn.ReLU()]
        channels, size = out, (size - 1) // stride + 1
    layers += [nn.Flatten(), nn.Linear(channels * size * size, 512), nn.ReLU(), nn.Linear(512, n_classes)]
    return nn.Sequential(*layers)


def cifar_spectra_study(
    output_dir: str | Path,
    n_samples: int = 50,
    window: int = 8,
    cifar_root: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Thesis Fig. 3.4 on the Table 3.1 networks: for WideCIFAR and ThinCIFAR, the singular values, ranks and
    condition numbers of every prefix Jacobian (each convolution and each ReLU), as medians over ``n_samples``
    inputs. The inputs are CIFAR-10 test images when ``cifar_root`` holds the data set, else standard normal
    inputs of CIFAR's size (the networks are at their seeded initialisation: train them with your own loop and
    call :func:`~invertnet.analysis.layer_spectra` for trained ones). The Jacobians are taken with respect to a
    ``window`` x ``window`` patch of the input (all channels), as the thesis suggests for large inputs.
    Saves ``cifar_spectra.png``."""
    from invertnet.data import load_cifar10

    generator = torch.Generator().manual_seed(seed)
    if cifar_root is not None and Path(cifar_root).exists():
        images = load_cifar10(cifar_root, "test")[0][:n_samples].double() / 255.0 - 0.5
        source = "CIFAR-10 test images"
    else:
        images = torch.randn(n_samples, 3, 32, 32, generator=generator, dtype=torch.float64)
        source = "standard normal inputs of CIFAR's size"
    start = (32 - window) // 2
    patch = (slice(start, start + window), slice(start, start + window))
    report: dict[str, Any] = {"inputs": source, "samples": len(images), "window": window, "networks": {}}
    medians: dict[str, list[dict[str, Any]]] = {}
    for variant in ("wide", "thin"):
        torch.manual_seed(seed)
        net = table_3_1_cnn(variant)
        convolutional = nn.Sequential(*list(net.children())[:12])  # the six convolutions and their ReLUs
        per_sample = [layer_spectra(convolutional, image, window=patch) for image in images]
        rows = []
        for depth, name in enumerate(dict(convolutional.named_children())):
            values = torch.stack([spectra[depth].singular_values for spectra in per_sample])
            rows.append(
                {
                    "layer": f"{type(convolutional[depth]).__name__} {name}",
                    "output_units": int(convolutional[: depth + 1](images[:1].float()).numel()),
                    "median_rank": float(torch.tensor([spectra[depth].rank for spectra in per_sample]).median()),
                    "median_condition_number": float(
                        torch.tensor([spectra[depth].condition_number for spectra in per_sample]).median()
                    ),
                    "median_singular_values": values.median(dim=0).values,
                }
            )
        medians[variant] = rows
        report["networks"][variant] = [
            {key: value for key, value in row.items() if key != "median_singular_values"} for row in rows
        ]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report["figure"] = str(_plot_cifar_spectra(medians, output_dir / "cifar_spectra.png"))
    return report


def _plot_cifar_spectra(medians: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Fig. 3.4: left, WideCIFAR's median singular values after every ReLU; right, output units, median number
    of non-zero singular values and median condition number per layer for both networks."""
    figure, axes = subplots(1, 4, figsize=(17, 3.8), feature="cifar_spectra.png")
    for row in medians["wide"][1::2]:  # after each ReLU
        values = row["median_singular_values"].clamp_min(1e-16)
        axes[0].semilogy(range(1, len(values) + 1), values.numpy(), label=row["layer"])
    axes[0].set(title="WideCIFAR: median singular values", xlabel="index", ylabel="singular value")
    axes[0].legend(fontsize=6)
    for variant, colour in (("wide", "tab:blue"), ("thin", "tab:red")):
        layers = range(1, len(medians[variant]) + 1)
        label = "WideCIFAR" if variant == "wide" else "ThinCIFAR"
        axes[1].plot(layers, [row["output_units"] for row in medians[variant]], color=colour, marker=".", label=label)
        axes[2].plot(layers, [row["median_rank"] for row in medians[variant]], color=colour, marker=".")
        axes[3].semilogy(layers, [row["median_condition_number"] for row in medians[variant]], color=colour, marker=".")
    axes[1].set(title="output units", xlabel="layer (conv, ReLU alternating)")
    axes[2].set(title="non-zero singular values (median)", xlabel="layer")
    axes[3].set(title="condition number (median)", xlabel="layer")
    axes[1].legend()
    return save_figure(figure, path)


def spheres_study(
    output_dir: str | Path, d: int = 500, n_unused: int = 10, radii: tuple[float, float] = (1.0, 1.3), seed: int = 0
) -> dict[str, Any]:
    """Thesis Fig. 6.3: the mis-aligned classifier of Example 6.6 (d = 500, 10 unused dimensions, R = 1 and 1.3)
    under both analytic attacks; accuracy against the l2 budget per attack and sphere. Saves ``spheres.png``."""
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = sample_spheres(2000, d, radii, generator)
    classifier = MisalignedSphereClassifier(n_unused).fit(x_train, y_train)
    x, y = sample_spheres(1000, d, radii, generator)
    budgets = torch.linspace(0, 1.0, 101, dtype=torch.float64)
    curves, report = {}, {"bias": classifier.bias, "clean_accuracy": (classifier(x) == y).double().mean().item()}
    for name, attack in (("perturbation", perturbation_attack), ("invariance", invariance_attack)):
        result = attack(classifier, x, radii)
        for sphere, chosen in (("inner", y < 0), ("outer", y > 0)):
            subset = type(result)(result.x[chosen], result.success[chosen], result.distance[chosen])
            curves[f"{name} attack, {sphere} sphere"] = (budgets, accuracy_under_attack(subset, budgets))
            report[f"{name}_success_{sphere}"] = subset.success.double().mean().item()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report["figure"] = str(plot_sphere_attacks(curves, output_dir / "spheres.png"))
    return report


def reconstruction_study(
    output_dir: str | Path,
    coefficients: tuple[float, ...] = (0.5, 0.7, 0.9),
    budgets: tuple[int, ...] = (1, 2, 3, 5, 8, 12, 20, 30, 50),
    steps: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """Thesis Fig. 4.3/4.4: i-ResNet classifiers on digits with Lipschitz coefficients c, trained alike; the
    max-abs error of inputs reconstructed from the features against the fixed-point iterations allowed per
    block. Smaller c contracts faster. Saves ``reconstruction.png``; returns the errors per c."""
    from invertnet.models.classifiers import iresnet_classifier

    (x_train, y_train), (x_test, _) = load_digits("train"), load_digits("test")
    x_train, x_test = centered_levels(x_train, DIGITS_LEVELS), centered_levels(x_test[:128], DIGITS_LEVELS).double()
    errors: dict[str, list[float]] = {}
    figure, axis = subplots(figsize=(6, 4), feature="reconstruction_study")
    for coeff in coefficients:
        torch.manual_seed(seed)
        model = iresnet_classifier(
            (1, 8, 8), 10, n_blocks=2, hidden_channels=32, n_stages=2, coeff=coeff, pad_channels=4
        )
        fit(CrossEntropy(model), (x_train, y_train), steps=steps, lr=3e-3, seed=seed)
        refine_spectral_norms(model)
        pad, *parts = model.body.double().eval()  # the padding is applied, not inverted
        body = InvertibleSequential(*parts)
        with torch.no_grad():
            padded = pad(x_test)
            features = body(padded)
            curve = [
                (body.inverse_result(features, max_iter=budget).value - padded).abs().max().item() for budget in budgets
            ]
        errors[f"c={coeff}"] = curve
        axis.semilogy(budgets, curve, marker="o", label=f"c = {coeff}")
    axis.set(xlabel="fixed-point iterations per block", ylabel="max-abs reconstruction error", title="digits i-ResNets")
    axis.legend()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return {
        "figure": str(save_figure(figure, output_dir / "reconstruction.png")),
        "budgets": list(budgets),
        "errors": errors,
    }
