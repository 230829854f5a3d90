r"""The registry of model kinds: a run config's ``model.kind`` names one of them.

Each family module defines its kinds' config classes and one :class:`~invertnet.app.kinds.base.ModelKind`
subclass; a kind is one line here. ``invertnet.app.config`` builds the ``model`` section as the union of the
registered config classes, discriminated on ``kind``.
"""

from invertnet.app.kinds.base import DEFAULT_PARAMETER_BUDGET as DEFAULT_PARAMETER_BUDGET
from invertnet.app.kinds.base import PARAMETER_BUDGET_VARIABLE as PARAMETER_BUDGET_VARIABLE
from invertnet.app.kinds.base import KindConfig as KindConfig
from invertnet.app.kinds.base import ModelKind as ModelKind
from invertnet.app.kinds.base import ParameterBudget as ParameterBudget
from invertnet.app.kinds.base import RunData as RunData
from invertnet.app.kinds.base import UnsupportedOperation as UnsupportedOperation
from invertnet.app.kinds.base import parameter_budget as parameter_budget
from invertnet.app.kinds.classifiers import (
    ClassifierKind,
    FullyInvertibleClassifierConfig,
    IResNetClassifierConfig,
    MintNetClassifierConfig,
)
from invertnet.app.kinds.conditional import ConditionalDenseFlowConfig, ConditionalFlowKind
from invertnet.app.kinds.flows import (
    DenseFlowConfig,
    FlowKind,
    GlowFlowConfig,
    MintNetFlowConfig,
    MultiscaleFlowConfig,
    RealNVPFlowConfig,
    SplineFlowConfig,
)
from invertnet.app.kinds.gans import DCGANConfig, GANKind
from invertnet.app.kinds.spectra import IsotopeNetConfig, ResidualNetConfig, SpectraKind

__all__ = [
    "DEFAULT_PARAMETER_BUDGET",
    "KINDS",
    "PARAMETER_BUDGET_VARIABLE",
    "KindConfig",
    "ModelKind",
    "ParameterBudget",
    "RunData",
    "UnsupportedOperation",
    "kind_of",
    "parameter_budget",
]

_REGISTERED = (
    FlowKind(DenseFlowConfig),
    FlowKind(MultiscaleFlowConfig),
    FlowKind(MintNetFlowConfig),
    FlowKind(RealNVPFlowConfig),
    FlowKind(GlowFlowConfig),
    FlowKind(SplineFlowConfig),
    ConditionalFlowKind(ConditionalDenseFlowConfig),
    ClassifierKind(MintNetClassifierConfig),
    ClassifierKind(IResNetClassifierConfig),
    ClassifierKind(FullyInvertibleClassifierConfig),
    GANKind(DCGANConfig),
    SpectraKind(IsotopeNetConfig),
    SpectraKind(ResidualNetConfig),
)

KINDS: dict[str, ModelKind] = {kind.name: kind for kind in _REGISTERED}
"""Model kinds by name."""


def kind_of(name: str) -> ModelKind:
    """The registered kind ``name``; a ``ValueError`` listing the kinds otherwise."""
    if name not in KINDS:
        raise ValueError(f"model kind {name!r} is unknown; registered kinds: {sorted(KINDS)}")
    return KINDS[name]
