"""Value checks can be switched off, and are off in compiled code: flows' training log_prob compiles whole, and an
eager training step then reads nothing back from the device (no host synchronisation on a GPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import invertnet
from invertnet.layers import ActNorm, Logit
from invertnet.models import (
    dense_iresnet_flow,
    glow_flow,
    mintnet_flow,
    multiscale_iresnet_flow,
    realnvp_flow,
    spline_flow,
)


def test_value_checks_can_be_switched_off_and_come_back():
    nan = torch.tensor([[math.nan, 0.0]])
    with pytest.raises(ValueError, match="1 NaN or infinite values"):
        ActNorm(2)(nan)
    with invertnet.validation(False):
        assert torch.isnan(ActNorm(2)(nan)).any()  # not checked: no device-to-host synchronisation
        assert torch.isfinite(Logit(0.05)(torch.tensor([[0.5, 1.02]]))).all()  # domain not checked either
        with pytest.raises(ValueError, match="expected at least one sample"):
            ActNorm(2)(torch.zeros(0, 2))  # shape checks need no values and always run
    with pytest.raises(ValueError, match="NaN or infinite"):
        ActNorm(2)(nan)
    with pytest.raises(RuntimeError), invertnet.validation(False):
        raise RuntimeError("the setting is restored on the way out")
    assert invertnet.core.validation_enabled()
    with pytest.raises(TypeError, match="expected True or False"):
        invertnet.set_validation("no")


FLOWS = pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: dense_iresnet_flow(2, n_blocks=2, hidden_features=16), (2,)),
        (lambda: multiscale_iresnet_flow((1, 8, 8), n_scales=2, n_blocks=1, hidden_channels=4, levels=17), (1, 8, 8)),
        (lambda: mintnet_flow((1, 8, 8), n_blocks=2, hidden_factor=1, n_squeezes=1, levels=17), (1, 8, 8)),
        (lambda: realnvp_flow((1, 8, 8), n_scales=2, n_steps=1, hidden=4, levels=17), (1, 8, 8)),
        (lambda: glow_flow((1, 8, 8), n_scales=2, n_steps=1, hidden=4, levels=17), (1, 8, 8)),
        (lambda: glow_flow(2, n_steps=2, hidden=8), (2,)),
        (lambda: spline_flow(2, n_steps=2, hidden=8), (2,)),
        (lambda: spline_flow((1, 4, 4), n_steps=2, hidden=8, levels=17), (1, 4, 4)),
        (
            lambda: dense_iresnet_flow(
                (1, 4, 4), n_blocks=1, hidden_features=8, levels=17, dequantization="variational"
            ),
            (1, 4, 4),
        ),
    ],
    ids=[
        "dense",
        "multiscale",
        "mintnet",
        "realnvp",
        "glow",
        "glow_vector",
        "spline",
        "spline_image",
        "dense_variational",
    ],
)


@FLOWS
def test_the_training_log_prob_compiles_without_graph_breaks(make, shape):
    flow = make()
    x = torch.randn(4, *shape) if len(shape) == 1 else torch.randint(0, 17, (4, *shape)).float()
    flow.log_prob(x)  # data-dependent initialisation (ActNorm) happens once, eagerly
    explanation = torch._dynamo.explain(flow.log_prob)(x)
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


class DeviceReads(TorchDispatchMode):
    """Counts the operations that copy a tensor's value to the host (``.item()``, ``bool(tensor)``)."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@FLOWS
def test_a_training_step_without_value_checks_reads_nothing_from_the_device(make, shape):
    flow = make()
    x = torch.randn(4, *shape) if len(shape) == 1 else torch.randint(0, 17, (4, *shape)).float()
    flow.log_prob(x)  # ActNorm's initialisation reads its flag until it is set
    with invertnet.validation(False), DeviceReads() as counter:
        flow.log_prob(x).mean().backward()
    assert counter.reads == []
    with DeviceReads() as counter:
        flow.log_prob(x)
    assert counter.reads, "with value checks on, the layers do read their inputs' finiteness"


def test_actnorm_reads_its_loaded_initialisation_flag():
    trained, fresh = ActNorm(2), ActNorm(2)
    trained(torch.randn(8, 2) * 3 + 1)
    fresh(torch.randn(8, 2))  # initialised on other data ...
    fresh.load_state_dict(ActNorm(2).state_dict())  # ... then reset by a state dict: initialises again
    fresh(torch.randn(8, 2) * 3 + 1)
    assert fresh.log_scale.abs().max() > 0.5
    reloaded = ActNorm(2)
    reloaded.load_state_dict(trained.state_dict())
    reloaded(torch.zeros(8, 2))  # a loaded, initialised layer keeps its parameters
    assert torch.equal(reloaded.log_scale, trained.log_scale)
