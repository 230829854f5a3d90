r"""Groups of ``model`` fields that several kinds share, so that a name means one thing for every kind."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from invertnet.app.kinds.base import KindConfig

__all__ = [
    "LEGACY_SCALES",
    "MAX_BLOCKS",
    "MAX_KERNEL",
    "MAX_SCALES",
    "MAX_WIDTH",
    "KernelSizes",
    "MintNetLayers",
    "ResidualStages",
]

# Upper limits of the size fields, far above any published setting (the thesis and the papers it follows use at
# most 100 blocks, 512 channels, kernels of 5 and 4 scales), so that a typo such as n_blocks=1e9 is refused by
# name instead of building for minutes; the parameter budget (ModelKind.build) bounds the product of the sizes.
MAX_BLOCKS = 1000
MAX_WIDTH = 65_536
MAX_SCALES = 16
MAX_KERNEL = 63

KernelSizes = Annotated[list[Annotated[int, Field(gt=0, le=MAX_KERNEL)]], Field(min_length=1, max_length=100)]
"""Odd kernel sizes of the layers of a branch, at most 100 layers."""

LEGACY_SCALES = ("n_squeezes", lambda n_scales: n_scales - 1)
"""invertnet 0.1 counted MintNet's scales (``n_scales``), one more than its squeezes."""


class MintNetLayers(KindConfig):
    """Grouped masked-convolution layers (Song, Meng & Ermon 2019, Eq. 2-4) with squeezes between them;
    MintNet needs a strictly increasing activation (section 3.3)."""

    n_blocks: int = Field(4, gt=0, le=MAX_BLOCKS, description="grouped (lower + upper) layers in all")
    hidden_factor: int = Field(8, gt=0, le=1024, description="copies of each channel in the hidden layers")
    n_squeezes: int = Field(1, ge=0, le=MAX_SCALES, description="squeezes, evenly spaced between the grouped layers")
    kernel_size: int = Field(3, gt=0, le=MAX_KERNEL, description="odd filter size of the masked convolutions")
    activation: Literal["elu", "softplus"] = "elu"
    legacy_names: ClassVar[dict] = {"n_scales": LEGACY_SCALES}


class ResidualStages(KindConfig):
    """Stages of convolutional i-ResNet blocks with a squeeze between two stages (thesis A.1)."""

    n_blocks: int = Field(4, gt=0, le=MAX_BLOCKS, description="residual blocks per stage")
    hidden_channels: int = Field(32, gt=0, le=MAX_WIDTH, description="channels of the residual branches")
    n_stages: int = Field(2, gt=0, le=MAX_SCALES, description="stages, one squeeze between two")
    legacy_names: ClassVar[dict] = {"hidden": "hidden_channels", "n_scales": "n_stages"}
