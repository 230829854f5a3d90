"""Invertible layers: i-ResNet blocks and their Lipschitz branches, MintNet masked layers, affine couplings and LU
linear maps (RealNVP, Glow), rational-quadratic spline couplings (neural spline flows), normalisation, reshapes;
memory-saving compositions (``MemorySavingSequential``); and deep equilibrium layers (``DEQ``), whose output is a
differentiable fixed point."""

from invertnet.layers.activations import ELU as ELU
from invertnet.layers.activations import CLipSwish as CLipSwish
from invertnet.layers.activations import LipSwish as LipSwish
from invertnet.layers.activations import Softplus as Softplus
from invertnet.layers.activations import make_activation as make_activation
from invertnet.layers.conditional import ConditionalLipschitzConvNet as ConditionalLipschitzConvNet
from invertnet.layers.conditional import ConditionalLipschitzMLP as ConditionalLipschitzMLP
from invertnet.layers.conditional import ContextBoundBranch as ContextBoundBranch
from invertnet.layers.conditional import ContextInput as ContextInput
from invertnet.layers.conditional import context_shape_at as context_shape_at
from invertnet.layers.coupling import AffineCoupling as AffineCoupling
from invertnet.layers.coupling import Coupling as Coupling
from invertnet.layers.coupling import coupling_mask as coupling_mask
from invertnet.layers.coupling import default_conditioner as default_conditioner
from invertnet.layers.deq import DEQ as DEQ
from invertnet.layers.deq import ContractiveCell as ContractiveCell
from invertnet.layers.deq import EquilibriumCell as EquilibriumCell
from invertnet.layers.linear import InvertibleConv1x1 as InvertibleConv1x1
from invertnet.layers.linear import LULinear as LULinear
from invertnet.layers.lipschitz_nets import Linearization as Linearization
from invertnet.layers.lipschitz_nets import LipschitzConvNet as LipschitzConvNet
from invertnet.layers.lipschitz_nets import LipschitzMLP as LipschitzMLP
from invertnet.layers.lipschitz_nets import LipschitzNet as LipschitzNet
from invertnet.layers.lipschitz_nets import ResidualBranch as ResidualBranch
from invertnet.layers.masked import MaskedConv2d as MaskedConv2d
from invertnet.layers.masked import MintBlock as MintBlock
from invertnet.layers.masked import MintLayer as MintLayer
from invertnet.layers.masked import triangular_mask as triangular_mask
from invertnet.layers.memory_saving import MemorySavingSequential as MemorySavingSequential
from invertnet.layers.memory_saving import saved_activation_bytes as saved_activation_bytes
from invertnet.layers.norm import ActNorm as ActNorm
from invertnet.layers.norm import InvertibleBatchNorm as InvertibleBatchNorm
from invertnet.layers.preprocess import Logit as Logit
from invertnet.layers.preprocess import UniformDequantization as UniformDequantization
from invertnet.layers.residual import InvertibleResidual as InvertibleResidual
from invertnet.layers.shape import Flatten as Flatten
from invertnet.layers.shape import InjectivePad as InjectivePad
from invertnet.layers.shape import Squeeze as Squeeze
from invertnet.layers.spectral import PowerIterationResult as PowerIterationResult
from invertnet.layers.spectral import SpectralNormConv2d as SpectralNormConv2d
from invertnet.layers.spectral import SpectralNormLayer as SpectralNormLayer
from invertnet.layers.spectral import SpectralNormLinear as SpectralNormLinear
from invertnet.layers.spectral import refine_spectral_norms as refine_spectral_norms
from invertnet.layers.spline_coupling import SplineCoupling as SplineCoupling
from invertnet.layers.splines import rational_quadratic_spline as rational_quadratic_spline
from invertnet.layers.variational_dequantization import ConvolutionalConditioner as ConvolutionalConditioner
from invertnet.layers.variational_dequantization import VariationalDequantization as VariationalDequantization

__all__ = [
    "DEQ",
    "CLipSwish",
    "ConvolutionalConditioner",
    "ConditionalLipschitzConvNet",
    "ConditionalLipschitzMLP",
    "ContextBoundBranch",
    "ContextInput",
    "ELU",
    "ActNorm",
    "AffineCoupling",
    "Coupling",
    "ContractiveCell",
    "EquilibriumCell",
    "Flatten",
    "InjectivePad",
    "InvertibleConv1x1",
    "InvertibleBatchNorm",
    "InvertibleResidual",
    "LULinear",
    "LipSwish",
    "Logit",
    "Linearization",
    "LipschitzConvNet",
    "LipschitzMLP",
    "LipschitzNet",
    "MaskedConv2d",
    "MemorySavingSequential",
    "MintBlock",
    "MintLayer",
    "PowerIterationResult",
    "ResidualBranch",
    "Softplus",
    "SplineCoupling",
    "SpectralNormConv2d",
    "SpectralNormLayer",
    "SpectralNormLinear",
    "Squeeze",
    "UniformDequantization",
    "VariationalDequantization",
    "context_shape_at",
    "coupling_mask",
    "default_conditioner",
    "make_activation",
    "rational_quadratic_spline",
    "refine_spectral_norms",
    "saved_activation_bytes",
    "triangular_mask",
]
