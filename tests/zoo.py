"""The layer zoo: every InvertibleModule with random, non-trivial parameters and a tiny input shape.

Each factory returns a float64 module in eval mode whose spectral norms have converged. A new layer joins
the generic suite by adding an entry here.
"""

import math
from collections.abc import Callable

import torch

from invertnet import InvertibleModule, InvertibleSequential
from invertnet.layers import (
    ActNorm,
    AffineCoupling,
    ConditionalLipschitzConvNet,
    ConditionalLipschitzMLP,
    Coupling,
    Flatten,
    InjectivePad,
    InvertibleBatchNorm,
    InvertibleConv1x1,
    InvertibleResidual,
    LipschitzConvNet,
    LipschitzMLP,
    Logit,
    LULinear,
    MaskedConv2d,
    MemorySavingSequential,
    MintBlock,
    MintLayer,
    SplineCoupling,
    Squeeze,
    UniformDequantization,
    context_shape_at,
    refine_spectral_norms,
)
from invertnet.logdet import DenseExactLogDet, ExactLogDet
from invertnet.models import dense_iresnet_flow, glow_flow, mintnet_flow, realnvp_flow, spline_flow

Sampler = Callable[[int], torch.Tensor]


def _gaussian(shape: tuple[int, ...]) -> Sampler:
    return lambda batch: 1.5 * torch.randn(batch, *shape, dtype=torch.float64)


def _levels(shape: tuple[int, ...], levels: int) -> Sampler:
    """Integer levels away from the ends, so that gradcheck's perturbations stay in the domain."""
    return lambda batch: torch.randint(1, levels - 1, (batch, *shape)).double()


def _unit_interval(shape: tuple[int, ...]) -> Sampler:
    return lambda batch: 0.1 + 0.8 * torch.rand(batch, *shape, dtype=torch.float64)


def _prepared(module: InvertibleModule, sample: Sampler) -> InvertibleModule:
    """Move to float64, run a few training steps (ActNorm init, power iterations), converge, set eval."""
    module = module.double()
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(sample(16))
    refine_spectral_norms(module)
    return module.eval()


def _actnorm() -> InvertibleModule:
    return ActNorm(3)


def _residual_mlp(activation: str, log_det=ExactLogDet, **options) -> Callable[[], InvertibleModule]:
    def build() -> InvertibleModule:
        g = LipschitzMLP(4, 16, n_layers=3, coeff=0.9, activation=activation, **options)
        return InvertibleResidual(g, log_det=log_det())

    return build


def _residual_conv() -> InvertibleModule:
    return InvertibleResidual(LipschitzConvNet(2, 4, kernel_sizes=(3, 1, 3), coeff=0.9), log_det=ExactLogDet())


def _residual_conv_clipswish() -> InvertibleModule:
    g = LipschitzConvNet(2, 3, kernel_sizes=(3, 1, 3), coeff=0.9, activation="clipswish")
    return InvertibleResidual(g, log_det=ExactLogDet())


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


def _memory_saving_stack() -> InvertibleModule:
    """The image stack whose backward pass reconstructs activations through the inverses."""
    return MemorySavingSequential(*_image_stack())


def _preprocessed_flow() -> InvertibleModule:
    return InvertibleSequential(
        UniformDequantization(5, noise="midpoint"),
        Logit(0.05),
        ActNorm(3),
        InvertibleResidual(LipschitzMLP(3, 8, coeff=0.9), log_det=ExactLogDet()),
    )


def _randomised_mint(module: InvertibleModule) -> InvertibleModule:
    """Masked-convolution weights and scales far from their near-identity initialisation, with diagonal
    taps of both signs in the raw parameters."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, MaskedConv2d):
                sub.raw_weight.normal_(0.0, 0.4)
                if sub.bias is not None:
                    sub.bias.normal_(0.0, 0.3)
            if isinstance(sub, MintLayer):
                sub.log_t.normal_(-0.5, 0.3)
    return module


def _mint_multiscale() -> InvertibleModule:
    return _randomised_mint(mintnet_flow((1, 4, 4), n_blocks=2, hidden_factor=1, n_squeezes=1).transform)


def _randomised_coupling(module: InvertibleModule) -> InvertibleModule:
    """Conditioners (zero last layer at initialisation) and LU scales (a rotation at initialisation) far from
    the identity, so that the couplings and linear maps have non-trivial log-dets."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, Coupling):
                for parameter in sub.conditioner.parameters():
                    parameter.normal_(0.0, 0.4)
            if isinstance(sub, LULinear | InvertibleConv1x1):
                sub.log_scale.normal_(0.0, 0.3)
                sub.upper.add_(0.2 * torch.randn_like(sub.upper))
    return module


def _coupling(*args, **options) -> Callable[[], InvertibleModule]:
    return lambda: _randomised_coupling(AffineCoupling(*args, hidden=6, **options))


def _spline(*args, **options) -> Callable[[], InvertibleModule]:
    return lambda: _randomised_coupling(SplineCoupling(*args, hidden=6, **options))


def _context(features: int) -> torch.Tensor:
    """A fixed context (one for every sample) far from zero."""
    return torch.linspace(-1.5, 2.0, features, dtype=torch.float64)


def _randomised_context_maps(module: InvertibleModule) -> InvertibleModule:
    """Context maps (zero at initialisation: every context starts unconditional) that matter."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, ConditionalLipschitzMLP | ConditionalLipschitzConvNet) or (
                isinstance(sub, MintLayer) and sub.context_features
            ):
                sub.context_map.weight.normal_(0.0, 0.5)
    return module


def _conditional_residual() -> InvertibleModule:
    g = ConditionalLipschitzMLP(4, 3, 16, n_layers=3, coeff=0.9, preactivation=True)
    return _randomised_context_maps(InvertibleResidual(g, log_det=DenseExactLogDet())).at(_context(3))


def _conditional_residual_conv() -> InvertibleModule:
    g = ConditionalLipschitzConvNet(2, 3, 4, kernel_sizes=(3, 1, 3), coeff=0.9)
    return _randomised_context_maps(InvertibleResidual(g, log_det=ExactLogDet())).at(_context(3))


def _conditional_dense_flow() -> InvertibleModule:
    flow = dense_iresnet_flow(3, n_blocks=2, hidden_features=8, context_features=2, log_det=ExactLogDet())
    return _randomised_context_maps(flow.transform).at(_context(2))


def _image_context(shape: tuple[int, ...]) -> torch.Tensor:
    """A fixed image context (one for every sample) far from zero."""
    return torch.linspace(-1.5, 2.0, math.prod(shape), dtype=torch.float64).view(shape)


def _conditional_residual_conv_image_context() -> InvertibleModule:
    g = ConditionalLipschitzConvNet(2, context_shape_at((1, 6, 6), 3, 3), 4, kernel_sizes=(3, 1, 3), coeff=0.9)
    return _randomised_context_maps(InvertibleResidual(g, log_det=ExactLogDet())).at(_image_context((1, 6, 6)))


def _conditional_mintnet_flow_image_context() -> InvertibleModule:
    flow = mintnet_flow((1, 4, 4), n_blocks=2, hidden_factor=1, n_squeezes=1, context_shape=(1, 4, 4))
    return _randomised_context_maps(_randomised_mint(flow.transform)).at(_image_context((1, 4, 4)))


def _conditional_mintnet_flow() -> InvertibleModule:
    flow = mintnet_flow((1, 4, 4), n_blocks=2, hidden_factor=1, n_squeezes=1, context_features=3)
    return _randomised_context_maps(_randomised_mint(flow.transform)).at(_context(3))


ZOO: dict[str, tuple[Callable[[], InvertibleModule], tuple[int, ...]]] = {
    "actnorm": (_actnorm, (3, 2, 2)),
    "actnorm_flat": (lambda: ActNorm(4), (4,)),
    "squeeze": (Squeeze, (2, 4, 4)),
    "flatten": (lambda: Flatten((2, 2, 3)), (2, 2, 3)),
    "injective_pad": (lambda: InjectivePad(2), (2, 2, 2)),
    "residual_mlp_elu": (_residual_mlp("elu"), (4,)),
    "residual_mlp_softplus": (_residual_mlp("softplus"), (4,)),
    "residual_mlp_lipswish": (_residual_mlp("lipswish"), (4,)),
    "residual_mlp_mixed_norm": (_residual_mlp("elu", norm_orders=(1.5, 3.0, 3.0, 1.5)), (4,)),
    "residual_mlp_anderson": (_residual_mlp_anderson, (4,)),
    "residual_mlp_dense_exact": (_residual_mlp("lipswish", log_det=DenseExactLogDet), (4,)),
    "residual_mlp_dense_exact_preactivation": (
        _residual_mlp("elu", log_det=DenseExactLogDet, preactivation=True),
        (4,),
    ),
    "residual_mlp_dense_exact_clipswish": (
        _residual_mlp("clipswish", log_det=DenseExactLogDet, preactivation=True),
        (4,),
    ),
    "residual_mlp_clipswish": (_residual_mlp("clipswish"), (4,)),
    "residual_conv": (_residual_conv, (2, 3, 3)),
    "residual_conv_clipswish": (_residual_conv_clipswish, (2, 3, 3)),
    "sequential_image": (_image_stack, (2, 2, 2)),
    "sequential_analytic": (lambda: InvertibleSequential(ActNorm(2), Squeeze(), Flatten((8, 1, 1))), (2, 2, 2)),
    "memory_saving_image": (_memory_saving_stack, (2, 2, 2)),
    "dequantization": (lambda: UniformDequantization(5, noise="midpoint"), (2, 3)),
    "logit": (lambda: Logit(0.05), (3,)),
    "preprocessed_flow": (_preprocessed_flow, (3,)),
    "batch_norm": (lambda: InvertibleBatchNorm(3), (3, 2, 2)),
    "mint_lower": (lambda: _randomised_mint(MintLayer(2, 3, direction="lower")), (2, 3, 3)),
    "mint_upper_softplus": (
        lambda: _randomised_mint(MintLayer(2, 2, direction="upper", activation="softplus")),
        (2, 3, 3),
    ),
    "mint_block": (lambda: _randomised_mint(MintBlock(1, 3, kernel_size=5)), (1, 4, 4)),
    "mintnet_multiscale": (_mint_multiscale, (1, 4, 4)),
    "coupling_half_exp": (_coupling((4,), "half"), (4,)),
    "coupling_alternating_unclamped": (_coupling((5,), "alternating", flip=True, clamp=None), (5,)),
    "coupling_custom_mask_sigmoid": (
        _coupling((4,), torch.tensor([1, 0, 0, 1]), scale="sigmoid", clamp=None),
        (4,),
    ),
    "coupling_channel_sigmoid": (_coupling((4, 2, 2), "channel", scale="sigmoid", clamp=None), (4, 2, 2)),
    "coupling_checkerboard": (_coupling((2, 3, 3), "checkerboard", flip=True), (2, 3, 3)),
    "spline_coupling_half": (_spline((4,), "half", bins=5, bound=2.0), (4,)),
    "spline_coupling_checkerboard": (_spline((2, 3, 3), "checkerboard", bins=3), (2, 3, 3)),
    "spline_coupling_channel": (_spline((4, 2, 2), "channel", flip=True, bins=4), (4, 2, 2)),
    "spline_flow_vector": (lambda: _randomised_coupling(spline_flow(3, n_steps=2, hidden=6, bins=4).transform), (3,)),
    "spline_flow_image": (
        lambda: _randomised_coupling(spline_flow((1, 2, 2), n_steps=2, hidden=5, bins=3, bound=1.5).transform),
        (1, 2, 2),
    ),
    "conditional_spline_flow": (
        lambda: _randomised_coupling(spline_flow(3, n_steps=2, hidden=6, bins=4, context_features=2).transform).at(
            _context(2)
        ),
        (3,),
    ),
    "lu_linear": (lambda: _randomised_coupling(LULinear(4)), (4,)),
    "invertible_conv1x1": (lambda: _randomised_coupling(InvertibleConv1x1(3)), (3, 2, 2)),
    "realnvp_vector": (lambda: _randomised_coupling(realnvp_flow(3, n_steps=2, hidden=6).transform), (3,)),
    "realnvp_image": (
        lambda: _randomised_coupling(realnvp_flow((1, 4, 4), n_scales=2, n_steps=1, hidden=3).transform),
        (1, 4, 4),
    ),
    "glow_vector": (lambda: _randomised_coupling(glow_flow(4, n_steps=2, hidden=6).transform), (4,)),
    "conditional_residual_mlp": (_conditional_residual, (4,)),
    "conditional_dense_flow": (_conditional_dense_flow, (3,)),
    "conditional_residual_conv": (_conditional_residual_conv, (2, 3, 3)),
    "conditional_mint_layer": (
        lambda: _randomised_context_maps(_randomised_mint(MintLayer(2, 2, context_features=3))).at(_context(3)),
        (2, 3, 3),
    ),
    "conditional_mintnet_flow": (_conditional_mintnet_flow, (1, 4, 4)),
    "conditional_residual_conv_image_context": (_conditional_residual_conv_image_context, (2, 3, 3)),
    "conditional_mintnet_flow_image_context": (_conditional_mintnet_flow_image_context, (1, 4, 4)),
    "conditional_realnvp_image_context": (
        lambda: _randomised_coupling(
            realnvp_flow((1, 4, 4), n_scales=2, n_steps=1, hidden=3, context_shape=(2, 2, 2)).transform
        ).at(_image_context((2, 2, 2))),
        (1, 4, 4),
    ),
    "conditional_coupling_image": (
        lambda: _coupling((2, 3, 3), "checkerboard", context_features=2)().at(_context(2)),
        (2, 3, 3),
    ),
    "conditional_glow_image": (
        lambda: _randomised_coupling(
            glow_flow((1, 4, 4), n_scales=2, n_steps=1, hidden=3, context_features=2).transform
        ).at(_context(2)),
        (1, 4, 4),
    ),
    "conditional_coupling_vector": (
        lambda: _randomised_coupling(realnvp_flow(3, n_steps=2, hidden=6, context_features=4).transform).at(
            _context(4)
        ),
        (3,),
    ),
    "glow_image": (
        lambda: _randomised_coupling(glow_flow((1, 4, 4), n_scales=2, n_steps=1, hidden=3).transform),
        (1, 4, 4),
    ),
}

#: Inputs from each layer's domain; layers not listed take Gaussian inputs.
SAMPLERS: dict[str, Callable[[tuple[int, ...]], Sampler]] = {
    "dequantization": lambda shape: _levels(shape, 5),
    "preprocessed_flow": lambda shape: _levels(shape, 5),
    "logit": _unit_interval,
}


def build(name: str) -> tuple[InvertibleModule, tuple[int, ...], Sampler]:
    """The module (float64, eval mode, converged), its input shape and a sampler of its domain."""
    factory, shape = ZOO[name]
    sample = SAMPLERS.get(name, _gaussian)(shape)
    return _prepared(factory(), sample), shape, sample
