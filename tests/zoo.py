"""The layer zoo: every InvertibleModule with random, non-trivial parameters and a tiny input shape.

Each factory returns a float64 module in eval mode whose spectral norms have converged. A new layer joins
the generic suite by adding an entry here.
"""

from collections.abc import Callable

import torch

from invertnet import InvertibleModule, InvertibleSequential
from invertnet.layers import (
    ActNorm,
    InjectivePad,
    InvertibleResidual,
    LipschitzConvNet,
    LipschitzMLP,
    Squeeze,
    refine_spectral_norms,
)
from invertnet.logdet import ExactLogDet


def _prepared(module: InvertibleModule, shape: tuple[int, ...]) -> InvertibleModule:
    """Move to float64, run a few training steps (ActNorm init, power iterations), converge, set eval."""
    module = module.double()
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(3.0 * torch.randn(16, *shape, dtype=torch.float64) + 0.5)
    refine_spectral_norms(module)
    return module.eval()


def _actnorm() -> InvertibleModule:
    return ActNorm(3)


def _residual_mlp(activation: str, **options) -> Callable[[], InvertibleModule]:
    def build() -> InvertibleModule:
        g = LipschitzMLP(4, 16, n_layers=3, coeff=0.9, activation=activation, **options)
        return InvertibleResidual(g, log_det=ExactLogDet())

    return build


def _residual_conv() -> InvertibleModule:
    return InvertibleResidual(LipschitzConvNet(2, 4, kernel_sizes=(3, 1, 3), coeff=0.9), log_det=ExactLogDet())


def _residual_mlp_anderson() -> InvertibleModule:
    g = LipschitzMLP(4, 16, n_layers=2, coeff=0.8)
    return InvertibleResidual(g, log_det=ExactLogDet(), solver="anderson")


def _image_stack() -> InvertibleModule:
    return InvertibleSequential(
        ActNorm(2),
        InvertibleResidual(LipschitzConvNet(2, 3, coeff=0.9), log_det=ExactLogDet()),
        Squeeze(),
        InvertibleResidual(LipschitzConvNet(8, 3, kernel_sizes=(1, 1), coeff=0.9), log_det=ExactLogDet()),
    )


ZOO: dict[str, tuple[Callable[[], InvertibleModule], tuple[int, ...]]] = {
    "actnorm": (_actnorm, (3, 2, 2)),
    "actnorm_flat": (lambda: ActNorm(4), (4,)),
    "squeeze": (Squeeze, (2, 4, 4)),
    "injective_pad": (lambda: InjectivePad(2), (2, 2, 2)),
    "residual_mlp_elu": (_residual_mlp("elu"), (4,)),
    "residual_mlp_softplus": (_residual_mlp("softplus"), (4,)),
    "residual_mlp_lipswish": (_residual_mlp("lipswish"), (4,)),
    "residual_mlp_mixed_norm": (_residual_mlp("elu", norm_orders=(1.5, 3.0, 3.0, 1.5)), (4,)),
    "residual_mlp_anderson": (_residual_mlp_anderson, (4,)),
    "residual_conv": (_residual_conv, (2, 3, 3)),
    "sequential_image": (_image_stack, (2, 2, 2)),
}


def build(name: str) -> tuple[InvertibleModule, tuple[int, ...]]:
    factory, shape = ZOO[name]
    return _prepared(factory(), shape), shape
