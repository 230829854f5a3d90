"""The dense (Behrmann et al. 2019, appendix C.3) and multi-scale (thesis A.2) i-ResNet flows."""

import pytest
import torch

from invertnet.layers import ActNorm, InvertibleResidual, Squeeze, refine_spectral_norms
from invertnet.logdet import ExactLogDet
from invertnet.models import dense_iresnet_flow, multiscale_iresnet_flow


def _ready(flow, data):
    flow = flow.double()
    flow.train()
    with torch.no_grad():
        flow.log_prob(data)  # ActNorm initialisation, power-iteration vectors sized
    refine_spectral_norms(flow)
    return flow.eval()


def test_dense_flow_has_the_seed_architecture():
    flow = dense_iresnet_flow(2, n_blocks=5)
    blocks = [m for m in flow.transform if isinstance(m, InvertibleResidual)]
    norms = [m for m in flow.transform if isinstance(m, ActNorm)]
    assert len(blocks) == len(norms) == 5
    # 2-64-64-64-2 MLP: (2*64 + 64) + (64*64 + 64) + (64*2 + 2) weights and biases, plus ActNorm's 2 + 2
    assert sum(p.numel() for p in flow.parameters()) == 5 * (192 + 4160 + 130 + 4)


def test_dense_flow_round_trip_and_log_prob():
    flow = dense_iresnet_flow(2, n_blocks=4, log_det=ExactLogDet())
    data = torch.randn(64, 2, dtype=torch.float64)
    flow = _ready(flow, data)
    with torch.no_grad():
        z = flow.transform(data)
        assert (flow.transform.inverse(z) - data).abs().max() < 1e-8
        assert torch.isfinite(flow.log_prob(data)).all()


def test_multiscale_flow_shapes_and_squeezes():
    flow = multiscale_iresnet_flow((1, 8, 8), n_scales=3, n_blocks=2, hidden_channels=4)
    assert flow.base.event_shape == (16, 2, 2)
    assert sum(isinstance(m, Squeeze) for m in flow.transform) == 2
    assert sum(isinstance(m, InvertibleResidual) for m in flow.transform) == 6


def test_multiscale_flow_on_discrete_images():
    flow = multiscale_iresnet_flow(
        (1, 8, 8), n_scales=2, n_blocks=1, hidden_channels=4, levels=17, log_det=ExactLogDet()
    )
    images = torch.randint(0, 17, (8, 1, 8, 8)).double()
    flow = _ready(flow, images)
    with torch.no_grad():
        bits = flow.bits_per_dim(images)
    assert bits.shape == (8,) and torch.isfinite(bits).all() and (bits > 0).all()
    samples = flow.sample((4,))
    assert samples.shape == (4, 1, 8, 8)
    assert torch.equal(samples, samples.round()) and samples.min() >= 0 and samples.max() <= 16


def test_multiscale_flow_refuses_sizes_it_cannot_squeeze():
    with pytest.raises(ValueError, match="divisible by 4"):
        multiscale_iresnet_flow((1, 6, 6), n_scales=3)
