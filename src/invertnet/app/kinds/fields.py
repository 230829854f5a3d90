r"""Groups of ``model`` fields that several kinds share, so that a name means one thing for every kind."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from invertnet.app.kinds.base import KindConfig

__all__ = ["LEGACY_SCALES", "MintNetLayers", "ResidualStages"]

LEGACY_SCALES = ("n_squeezes", lambda n_scales: n_scales - 1)
"""invertnet 0.1 counted MintNet's scales (``n_scales``), one more than its squeezes."""


class MintNetLayers(KindConfig):
    """Grouped masked-convolution layers (Song, Meng & Ermon 2019, Eq. 2-4) with squeezes between them;
    MintNet needs a strictly increasing activation (section 3.3)."""

    n_blocks: int = Field(4, gt=0, description="grouped (lower + upper) layers in all")
    hidden_factor: int = Field(8, gt=0, description="copies of each channel in the hidden layers")
    n_squeezes: int = Field(1, ge=0, description="squeezes, evenly spaced between the grouped layers")
    kernel_size: int = Field(3, gt=0, description="odd filter size of the masked convolutions")
    activation: Literal["elu", "softplus"] = "elu"
    legacy_names: ClassVar[dict] = {"n_scales": LEGACY_SCALES}


class ResidualStages(KindConfig):
    """Stages of convolutional i-ResNet blocks with a squeeze between two stages (thesis A.1)."""

    n_blocks: int = Field(4, gt=0, description="residual blocks per stage")
    hidden_channels: int = Field(32, gt=0, description="channels of the residual branches")
    n_stages: int = Field(2, gt=0, description="stages, one squeeze between two")
    legacy_names: ClassVar[dict] = {"hidden": "hidden_channels", "n_scales": "n_stages"}
