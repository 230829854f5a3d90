"""Reshaping layers beyond the generic suite: the range check of injective padding."""

import pytest
import torch

from invertnet.layers import InjectivePad


def test_injective_padding_refuses_points_off_its_range():
    pad = InjectivePad(2)
    y = pad(torch.randn(3, 1, 2, 2))
    y[1, 2, 0, 0] = 5e-3  # far above the float32 default 1e-3: not in the range
    with pytest.raises(ValueError, match="not in the range"):
        pad.inverse(y)
    y[1, 2, 0, 0] = 5e-4  # an iterative inverse's error: accepted
    assert pad.inverse(y).shape == (3, 1, 2, 2)
    with pytest.raises(ValueError, match="range_tolerance=1.0e-04"):
        InjectivePad(2, range_tolerance=1e-4).inverse(y)


def test_actnorm_leaves_constant_padded_channels_unscaled():
    from invertnet.layers import ActNorm

    layer = ActNorm(3)
    layer(InjectivePad(1)(torch.randn(16, 2, 4, 4)))  # data-dependent initialisation
    assert layer.log_scale[2].item() == 0.0 and layer.log_scale[:2].abs().max() < 1.0
