"""Affine couplings, LU linear maps and the RealNVP / Glow flows beyond the generic suite: the identity at
initialisation, the two scales, masks and their errors, the LU log-det, and the flows' layouts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invertnet
from invertnet.layers import (
    ActNorm,
    AffineCoupling,
    InvertibleConv1x1,
    Logit,
    LULinear,
    Squeeze,
    UniformDequantization,
    coupling_mask,
)
from invertnet.models import glow_flow, realnvp_flow
from tests.tolerances import assert_close


class _Fixed(nn.Module):
    """A conditioner returning a fixed function of its input, recording what it was given."""

    def __init__(self, out_channels: int, gain: float = 1.0) -> None:
        super().__init__()
        self.out_channels, self.gain, self.seen = out_channels, gain, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach().clone()
        summary = x.flatten(1).sum(dim=1).view(-1, *([1] * (x.dim() - 1)))
        index = torch.arange(1, self.out_channels + 1, dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        return self.gain * torch.sin(summary * index).expand(x.shape[0], -1, *x.shape[2:])


@pytest.mark.parametrize(
    "shape, mask", [((4,), "half"), ((5,), "alternating"), ((4, 2, 2), "channel"), ((2, 4, 4), "checkerboard")]
)
def test_the_exp_coupling_is_the_identity_at_initialisation(shape, mask):
    layer = AffineCoupling(shape, mask, hidden=8)
    x = torch.randn(3, *shape)
    y, log_det = layer.forward_and_log_det(x)
    assert torch.equal(y, x) and torch.equal(log_det, torch.zeros(3))
    assert torch.equal(layer.inverse(x), x)


def test_the_glow_scale_is_sigmoid_of_h_plus_two():
    """Kingma & Dhariwal's code: scale = sigmoid(h + 2); at initialisation (h = 0) x_b is scaled by sigmoid(2)."""
    fresh = AffineCoupling((4,), "half", hidden=8, scale="sigmoid", clamp=None)
    x = torch.randn(3, 4)
    y, log_det = fresh.forward_and_log_det(x)
    assert torch.equal(y[:, :2], x[:, :2])
    assert_close(y[:, 2:], x[:, 2:] * torch.sigmoid(torch.tensor(2.0)), atol=1e-6, rtol=1e-6)  # float32
    assert_close(log_det, torch.full((3,), 2 * math.log(1 / (1 + math.exp(-2)))), atol=1e-6, rtol=1e-6)

    conditioner = _Fixed(4, gain=3.0).double()
    layer = AffineCoupling((4,), "half", conditioner=conditioner, scale="sigmoid", clamp=None).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    y, log_det = layer.forward_and_log_det(x)
    shift, raw = conditioner(x[:, :2]).chunk(2, dim=1)
    assert_close(y[:, 2:], x[:, 2:] * torch.sigmoid(raw + 2) + shift)
    assert_close(log_det, torch.log(torch.sigmoid(raw + 2)).sum(dim=1))


def test_the_exp_scale_is_softly_clamped_and_unbounded_without_clamp():
    x = torch.randn(6, 4, dtype=torch.float64)
    clamped = AffineCoupling((4,), "half", conditioner=_Fixed(4, gain=50.0), clamp=1.5).double()
    free = AffineCoupling((4,), "half", conditioner=_Fixed(4, gain=50.0), clamp=None).double()
    _, log_det = clamped.forward_and_log_det(x)
    assert (log_det.abs() <= 2 * 1.5).all() and log_det.abs().max() > 2  # two features, each |log scale| <= 1.5
    _, free_log_det = free.forward_and_log_det(x)
    shift, raw = free.conditioner(x[:, :2]).chunk(2, dim=1)
    assert_close(free_log_det, raw.sum(dim=1))
    assert free_log_det.abs().max() > 3


def test_a_checkerboard_coupling_follows_eq_9():
    """y = b x + (1 - b)(x exp(s(b x)) + t(b x)) (Dinh et al. 2017, Eq. 9): the conditioner sees b * x only."""
    conditioner = _Fixed(4).double()
    layer = AffineCoupling((2, 3, 3), "checkerboard", conditioner=conditioner, clamp=None).double()
    b = coupling_mask((2, 3, 3), "checkerboard").double()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    y, log_det = layer.forward_and_log_det(x)
    assert torch.equal(conditioner.seen, b * x)
    shift, s = conditioner(b * x).chunk(2, dim=1)
    assert_close(y, b * x + (1 - b) * (x * torch.exp(s) + shift))
    assert_close(log_det, ((1 - b) * s).flatten(1).sum(dim=1))


def test_masks_split_as_documented():
    assert coupling_mask((5,), "half").tolist() == [True, True, False, False, False]
    assert coupling_mask((4,), "half", flip=True).tolist() == [False, False, True, True]
    channel = coupling_mask((4, 2, 2), "channel")
    assert channel[:2].all() and not channel[2:].any()
    layer = AffineCoupling((4,), torch.tensor([0.0, 1.0, 1.0, 0.0]), hidden=4)
    assert layer.layout == "split" and layer.conditioning_index.tolist() == [1, 2]
    assert AffineCoupling((2, 2, 2), "checkerboard", hidden=4).layout == "masked"


@pytest.mark.parametrize(
    "shape, mask, options, message",
    [
        ((4,), torch.ones(4), {}, "leaves the transformed part empty"),
        ((4,), torch.zeros(4), {}, "leaves the conditioning part empty"),
        ((4,), torch.tensor([1.0, 0.5, 0.0, 1.0]), {}, "mask entries must be 0 / 1"),
        ((4,), torch.ones(3), {}, r"the mask has shape \(3,\), the event shape is \(4,\)"),
        ((4,), torch.tensor([1, 0, 1, 0]), {"flip": True}, "flip applies to named masks"),
        ((4,), "checkerboard", {}, "does not apply to event shape"),
        ((1, 4, 4), "channel", {}, "leaves one part empty for event shape"),
        ((1,), "half", {}, "leaves one part empty"),
        ((2, 4), "half", {}, r"event_shape must be \(d,\) or \(C, H, W\)"),
        ((4,), "half", {"scale": "tanh"}, "scale must be 'exp'"),
        ((4,), "half", {"scale": "sigmoid"}, "takes no clamp"),
        ((4,), "half", {"clamp": -1.0}, "clamp must be a positive finite number"),
        ((4,), "half", {"hidden": 0}, "hidden must be positive"),
        ((4,), [1, 0, 1, 0], {}, "mask must be a name or a tensor"),
    ],
)
def test_invalid_couplings_are_refused_by_name(shape, mask, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        AffineCoupling(shape, mask, **options)


def test_a_conditioner_of_the_wrong_shape_is_named():
    layer = AffineCoupling((4,), "half", conditioner=nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r"the conditioner maps \(5, 2\) to \(5, 3\), expected \(5, 4\)"):
        layer(torch.randn(5, 4))


@pytest.mark.parametrize(
    "layer, x, message",
    [
        (AffineCoupling((4,), "half"), torch.randn(2, 5), r"AffineCoupling.forward: expected input of shape \(B, 4\)"),
        (LULinear(3), torch.randn(2, 3, 1), r"LULinear.forward: expected input of shape \(B, 3\)"),
        (InvertibleConv1x1(3), torch.randn(2, 4, 2, 2), r"InvertibleConv1x1.forward: expected input of shape"),
        (InvertibleConv1x1(3), torch.randn(2, 3), r"\(B, 3, H, W\), got \(2, 3\)"),
    ],
)
def test_inputs_of_the_wrong_shape_are_refused_by_name(layer, x, message):
    with pytest.raises(ValueError, match=message):
        layer(x)


def test_value_checks_follow_the_validation_switch():
    nan = torch.full((2, 4), math.nan)
    for layer in (AffineCoupling((4,), "half", hidden=4), LULinear(4)):
        with pytest.raises(ValueError, match="NaN or infinite"):
            layer(nan)
        with invertnet.validation(False):
            assert torch.isnan(layer(nan)).all()


def test_lu_log_det_is_slogdet_of_the_assembled_matrix_and_starts_at_a_rotation():
    layer = LULinear(5).double()
    weight = layer.weight()
    assert_close(
        weight @ weight.T, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0
    )  # a rotation, built in float32
    with torch.no_grad():
        layer.log_scale.normal_(0.0, 0.5)
        layer.lower.normal_()
        layer.upper.normal_()
    x = torch.randn(3, 5, dtype=torch.float64)
    y, log_det = layer.forward_and_log_det(x)
    assert_close(y, x @ layer.weight().T)
    assert_close(log_det, torch.linalg.slogdet(layer.weight()).logabsdet.expand(3))


def test_the_1x1_convolution_is_a_convolution_with_h_w_times_the_log_det():
    conv = InvertibleConv1x1(3).double()
    with torch.no_grad():
        conv.log_scale.normal_(0.0, 0.5)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y, log_det = conv.forward_and_log_det(x)
    assert_close(y, F.conv2d(x, conv.weight().view(3, 3, 1, 1)))
    assert_close(log_det, 20 * torch.linalg.slogdet(conv.weight()).logabsdet.expand(2))


def test_the_lu_inverse_uses_triangular_solves_not_a_matrix_inverse(monkeypatch):
    layer = InvertibleConv1x1(4).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    y = layer(x)

    def refuse(*args, **kwargs):
        raise AssertionError("the inverse must not invert W")

    for name in ("inv", "solve", "inv_ex"):
        monkeypatch.setattr(torch.linalg, name, refuse)
    monkeypatch.setattr(torch, "inverse", refuse)
    assert_close(layer.inverse(y), x, atol=1e-12, rtol=0)


def test_flows_have_the_documented_layout():
    glow = glow_flow((1, 8, 8), n_scales=2, n_steps=2, hidden=4, levels=17)
    parts = list(glow.transform)
    assert isinstance(parts[0], UniformDequantization) and isinstance(parts[1], Logit)
    assert [type(part) for part in parts[2:6]] == [Squeeze, ActNorm, InvertibleConv1x1, AffineCoupling]
    couplings = [part for part in parts if isinstance(part, AffineCoupling)]
    assert len(couplings) == 4 and all(c.scale == "sigmoid" and c.mask_name == "channel" for c in couplings)
    assert glow.base.event_shape == (16, 2, 2)

    realnvp = realnvp_flow((1, 8, 8), n_scales=2, n_steps=3, hidden=4)
    masks = [(part.mask_name, part.event_shape[0]) for part in realnvp.transform if isinstance(part, AffineCoupling)]
    assert masks == [("checkerboard", 1)] * 3 + [("channel", 4)] * 3 + [("checkerboard", 4)] * 4
    vector = realnvp_flow(2, n_steps=4, hidden=4)
    flips = [part.mask.tolist() for part in vector.transform if isinstance(part, AffineCoupling)]
    assert flips == [[True, False], [False, True]] * 2
    assert vector.transform.exact_log_det and vector.transform.analytic_inverse


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: glow_flow(4, n_scales=2), r"vectors \(4,\) have one scale"),
        (lambda: glow_flow((1, 6, 6), n_scales=2), "2 squeezes need H and W divisible by 4, got 6x6"),
        (lambda: realnvp_flow((1, 6, 6), n_scales=3), "2 squeezes need H and W divisible by 4"),
        (lambda: realnvp_flow((8, 8)), r"expected a number of features d, \(d,\) or an image shape"),
        (lambda: realnvp_flow(2, n_steps=0), "n_steps must be positive"),
        (lambda: glow_flow((1, 8, 8), n_scales=0), "n_scales must be positive"),
    ],
)
def test_invalid_flows_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("make", [lambda: realnvp_flow(2, n_steps=4, hidden=16), lambda: glow_flow(2, hidden=16)])
def test_a_few_steps_of_maximum_likelihood_lower_the_loss(make):
    """The conditioners' zero last layers still receive gradients: the flows learn from the start."""
    torch.manual_seed(0)
    flow = make()
    first = torch.randn(512)
    data = torch.stack([first, 0.5 * first**2 + 0.3 * torch.randn(512)], dim=1)  # a banana: not Gaussian
    flow.log_prob(data)  # ActNorm's data-dependent initialisation
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    before = -flow.log_prob(data).mean().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        optimizer.step()
    after = -flow.log_prob(data).mean().item()
    assert after < before - 0.05, (before, after)
    with torch.no_grad():
        assert_close(flow.transform.inverse(flow.transform(data)), data, atol=1e-4, rtol=0)


def test_the_coupling_base_names_what_a_subclass_must_implement():
    from invertnet.layers import Coupling

    with pytest.raises(NotImplementedError, match="Coupling is a base class; a subclass sets parameters_per_entry"):
        Coupling((4,), "half", hidden=4)(torch.randn(3, 4))
