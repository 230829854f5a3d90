r"""Certificates of invertibility for residual networks (thesis Remark 4.9, Eq. 4.6, Lemmas 4.6 and 5.5).

Power iteration, which spectral normalisation runs during training, bounds a layer's norm from *below*, so
Lip(g) < 1 must be checked after training with bounds from *above*. For every residual block x + g(x),
:func:`certify` bounds the 2-norm of each linear layer of g from above (dense layers: the largest singular
value of the weight with its rounding margin, :func:`~invertnet.layers.operator_norms.matrix_norm_bound`;
convolutions: the exact norm for small operators, else the largest singular value of the circular convolution on
a containing torus, :func:`~invertnet.analysis.conv_norm_bounds`, with power iteration as the lower bound),
multiplies them (activations must be known to be 1-Lipschitz, Eq. 4.6), and derives the forward and inverse
Lipschitz constants 1 + L and 1 / (1 - L) (Lemma 4.6) and the log-det bounds d log(1 -+ L) (Lemma 5.5).
Branches may be invertnet's Lipschitz nets or plain ``nn.Sequential`` stacks of ``nn.Linear`` / ``nn.Conv2d``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from invertnet.analysis.spectral import conv_norm_bounds
from invertnet.figures import save_figure, subplots
from invertnet.layers.activations import ELU, LipSwish, Softplus
from invertnet.layers.operator_norms import matrix_norm_bound
from invertnet.layers.residual import InvertibleResidual

__all__ = ["BlockCertificate", "Certificate", "LayerNorm", "certify", "plot_certificate"]

#: Activations whose Lipschitz constant is at most 1.
ONE_LIPSCHITZ = (ELU, Softplus, LipSwish, nn.ELU, nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Softplus, nn.Identity)


@dataclass
class LayerNorm:
    """Bounds on the 2-norm of one linear layer of a residual branch."""

    name: str
    lower: float
    upper: float


@dataclass
class BlockCertificate:
    """The certificate of one residual block x + g(x).

    Attributes:
        name: The block's name in the model.
        dimension: d, the number of entries of one input sample of the block.
        layers: Norm bounds of g's linear layers, in order.
        lipschitz_lower, lipschitz_upper: The product of the layers' norms (Eq. 4.6) lies in [lower, upper];
            ``upper`` bounds Lip(g). ``lower`` only says how tight that is (Lip(g) itself can be smaller).
            ``None`` when g holds a module that cannot be bounded.
        reason: Why the block cannot be certified, if so.
    """

    name: str
    dimension: int
    layers: list[LayerNorm] = field(default_factory=list)
    lipschitz_lower: float | None = None
    lipschitz_upper: float | None = None
    reason: str = ""

    @property
    def certified(self) -> bool:
        """Lip(g) < 1 holds for certain: the block is invertible (thesis Theorem 4.1)."""
        return self.lipschitz_upper is not None and self.lipschitz_upper < 1

    @property
    def forward_lipschitz(self) -> float | None:
        """Lip(F) <= 1 + Lip(g) (Lemma 4.6)."""
        return None if self.lipschitz_upper is None else 1 + self.lipschitz_upper

    @property
    def inverse_lipschitz(self) -> float | None:
        """Lip(F^{-1}) <= 1 / (1 - Lip(g)) (Lemma 4.6), when Lip(g) < 1 is certified."""
        return 1 / (1 - self.lipschitz_upper) if self.certified else None  # type: ignore[operator]


@dataclass
class Certificate:
    """The certificates of all residual blocks of a model, with the log-det bounds of Lemma 5.5.

    Attributes:
        blocks: One :class:`BlockCertificate` per residual block, in model order.
        log_det_lower, log_det_upper: Bounds on the residual blocks' total log|det J| per sample,
            sum_t d_t log(1 -+ Lip(g_t)) (``None`` unless every block is certified).
    """

    blocks: list[BlockCertificate]
    log_det_lower: float | None
    log_det_upper: float | None

    @property
    def certified(self) -> bool:
        """Every residual block is certified invertible."""
        return bool(self.blocks) and all(block.certified for block in self.blocks)

    @property
    def verdict(self) -> str:
        """One sentence: certified, or which blocks fail and by how much."""
        if not self.blocks:
            return "no residual blocks found: nothing to certify"
        if self.certified:
            worst = max(self.blocks, key=lambda block: block.lipschitz_upper or 0.0)
            return (
                f"certified: all {len(self.blocks)} residual blocks have Lip(g) < 1 "
                f"(largest bound {worst.lipschitz_upper:.6f}, block {worst.name!r})"
            )
        failures = []
        for block in self.blocks:
            if block.lipschitz_upper is None:
                failures.append(f"{block.name!r} cannot be bounded ({block.reason})")
            elif not block.certified:
                failures.append(
                    f"{block.name!r} has Lip(g) <= {block.lipschitz_upper:.6f}, exceeding 1 by "
                    f"{block.lipschitz_upper - 1:.6f}"
                )
        return f"NOT certified: {len(failures)} of {len(self.blocks)} blocks fail: " + "; ".join(failures)

    def table(self) -> str:
        """A fixed-width table of the blocks' bounds."""
        lines = [f"{'block':<28} {'dim':>6} {'layers':>6} {'prod >=':>10} {'Lip(g) <=':>10} {'Lip(F^-1)':>10}  ok"]
        for block in self.blocks:
            low, high, inverse = (
                f"{value:10.6f}" if value is not None else f"{'n/a':>10}"
                for value in (block.lipschitz_lower, block.lipschitz_upper, block.inverse_lipschitz)
            )
            ok = "yes" if block.certified else "NO"
            lines.append(f"{block.name:<28} {block.dimension:>6} {len(block.layers):>6} {low} {high} {inverse}  {ok}")
        if self.log_det_lower is not None:
            lines.append(f"residual log|det J| in [{self.log_det_lower:.4f}, {self.log_det_upper:.4f}] per sample")
        lines.append(self.verdict)
        return "\n".join(lines)


def _certify_block(
    name: str, block: InvertibleResidual, shapes: dict[nn.Module, tuple[int, ...]], rtol: float
) -> BlockCertificate:
    if block not in shapes:
        raise ValueError(f"certify: block {name!r} was not reached by the example input")
    certificate = BlockCertificate(name=name, dimension=math.prod(shapes[block]))
    lower = upper = 1.0
    for layer_name, layer in block.g.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            try:
                low, high = _layer_bounds(layer, shapes[layer], rtol)
            except ValueError as error:
                certificate.reason = f"layer {layer_name!r}: {error}"
                return certificate
            certificate.layers.append(LayerNorm(layer_name, low, high))
            lower, upper = lower * low, upper * high
        elif not list(layer.children()) and not isinstance(layer, ONE_LIPSCHITZ):
            certificate.reason = f"layer {layer_name!r} ({type(layer).__name__}) has no known Lipschitz bound"
            return certificate
    certificate.lipschitz_lower, certificate.lipschitz_upper = lower, upper
    return certificate


def _effective_weight(layer: nn.Module) -> Tensor:
    """The weight the layer applies: spectrally normalised layers scale theirs (Eq. 4.9)."""
    normalized = getattr(layer, "normalized_weight", None)
    return (normalized() if callable(normalized) else layer.weight).detach()


def _layer_bounds(layer: nn.Module, input_shape: tuple[int, ...], rtol: float) -> tuple[float, float]:
    weight = _effective_weight(layer).double()
    if isinstance(layer, nn.Linear):
        return torch.linalg.matrix_norm(weight, ord=2).item(), matrix_norm_bound(weight)
    if isinstance(layer, nn.Conv2d):
        if (
            layer.groups != 1
            or layer.dilation != (1, 1)
            or layer.padding_mode != "zeros"
            or layer.stride[0] != layer.stride[1]
        ):
            raise ValueError("only ungrouped, undilated, zero-padded convolutions with equal strides are supported")
        padding = layer.padding
        if isinstance(padding, str):  # "valid" or "same" (stride 1, odd kernels pad (k - 1) / 2)
            if padding == "same" and any(k % 2 == 0 for k in layer.kernel_size):
                raise ValueError("padding='same' with an even kernel pads asymmetrically; not supported")
            padding = (0, 0) if padding == "valid" else tuple((k - 1) // 2 for k in layer.kernel_size)
        if padding[0] != padding[1]:
            raise ValueError("only equal padding in both directions is supported")
        bounds = conv_norm_bounds(weight, input_shape, layer.stride[0], padding[0], rtol=rtol)
        return bounds.lower, bounds.upper
    raise ValueError(f"{type(layer).__name__} is not a linear layer")


@torch.no_grad()
def certify(model: nn.Module, x: Tensor, *, rtol: float = 1e-8) -> Certificate:
    r"""Certify every residual block of ``model`` (thesis Remark 4.9; Behrmann et al. 2019, appendix B).

    Arguments:
        model: Any module containing :class:`~invertnet.layers.InvertibleResidual` blocks.
        x: An example input batch, run once (in eval mode) to find each layer's input size.
        rtol: Tolerance of the power iterations giving the lower bounds of convolution norms.

    Examples:
        >>> from invertnet.layers import InvertibleResidual, LipschitzMLP
        >>> block = InvertibleResidual(LipschitzMLP(2, 16, coeff=0.9))
        >>> certify(block, torch.randn(4, 2)).certified
        True
    """
    blocks = [
        (name or type(module).__name__, module)
        for name, module in model.named_modules()
        if isinstance(module, InvertibleResidual)
    ]
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        shapes.setdefault(module, tuple(inputs[0].shape[1:]))

    watched = (nn.Linear, nn.Conv2d, InvertibleResidual)
    hooks = [module.register_forward_pre_hook(record) for module in model.modules() if isinstance(module, watched)]
    modes = {module: module.training for module in model.modules()}
    model.eval()  # no power-iteration updates: the bounds are for the weights model(x) used
    try:
        model(x)
        certificates = [_certify_block(name, block, shapes, rtol) for name, block in blocks]
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
    log_det_lower = log_det_upper = None
    if certificates and all(block.certified for block in certificates):
        log_det_lower = sum(block.dimension * math.log1p(-block.lipschitz_upper) for block in certificates)  # type: ignore[operator]
        log_det_upper = sum(block.dimension * math.log1p(block.lipschitz_upper) for block in certificates)  # type: ignore[arg-type]
    return Certificate(certificates, log_det_lower, log_det_upper)


def plot_certificate(certificate: Certificate, path: str | Path) -> Path:
    """Save the largest singular value of every linear layer, block by block (thesis Fig. 4.2), with each
    block's bound on Lip(g); bars above 1 are the ones that break the certificate.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'invertnet[plots]'``).
    """
    figure, (layers_axis, blocks_axis) = subplots(1, 2, figsize=(12, 4), feature="plot_certificate")
    position = 0
    for block in certificate.blocks:
        uppers = [layer.upper for layer in block.layers]
        layers_axis.bar(range(position, position + len(uppers)), uppers, label=block.name)
        position += len(uppers) + 1
    layers_axis.axhline(1.0, color="red", linestyle="--", linewidth=1)
    layers_axis.set(title="largest singular value per layer", xlabel="layer (grouped by block)", ylabel="sigma_max")
    names = [block.name for block in certificate.blocks]
    bounds = [
        block.lipschitz_upper if block.lipschitz_upper is not None else float("nan") for block in certificate.blocks
    ]
    colours = ["tab:green" if block.certified else "tab:red" for block in certificate.blocks]
    blocks_axis.bar(range(len(bounds)), bounds, color=colours)
    blocks_axis.axhline(1.0, color="red", linestyle="--", linewidth=1)
    blocks_axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    blocks_axis.set(title="bound on Lip(g) per residual block", ylabel="product of layer norms (Eq. 4.6)")
    return save_figure(figure, path)
