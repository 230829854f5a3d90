"""The generic suite: every InvertibleModule of the zoo through the same checks (STYLE.md section 5)."""

import pytest
import torch
from safetensors.torch import load, save

from invertnet import SolverStatus
from tests.tolerances import FLOAT64_INVERSE_ATOL, assert_close
from tests.zoo import ZOO, build

NAMES = sorted(ZOO)
BATCH = 3


def _brute_force_log_det(module, x):
    """0.5 * logdet(J^T J) per sample from the full autograd Jacobian: log|det J| for square J."""
    values = []
    for sample in x:
        jac = torch.autograd.functional.jacobian(lambda v: module(v.unsqueeze(0)).flatten(), sample)
        jac = jac.reshape(jac.shape[0], -1)
        if jac.shape[0] == jac.shape[1]:
            values.append(torch.linalg.slogdet(jac).logabsdet)
        else:
            values.append(0.5 * torch.linalg.slogdet(jac.T @ jac).logabsdet)
    return torch.stack(values)


@pytest.fixture(params=NAMES)
def layer_name(request):
    return request.param


@pytest.fixture
def layer(layer_name):
    return build(layer_name)


def test_shapes(layer):
    module, shape, sample = layer
    y, log_det = module.forward_and_log_det(sample(BATCH))
    assert y.shape[0] == BATCH
    assert log_det.shape == (BATCH,)
    assert log_det.dtype == torch.float64


def test_round_trip_both_directions(layer):
    module, shape, sample = layer
    x = sample(BATCH)
    with torch.no_grad():
        assert_close(module.inverse(module(x).clone()), x, atol=FLOAT64_INVERSE_ATOL, rtol=0)
        y = module(sample(BATCH))  # the inverse's domain is the range of the forward map
        assert_close(module(module.inverse(y.clone())), y, atol=FLOAT64_INVERSE_ATOL, rtol=0)


def test_log_det_against_brute_force_jacobian(layer):
    module, shape, sample = layer
    if not module.exact_log_det:
        pytest.skip("stochastic log-det: tested against its stated bias in test_logdet.py")
    x = sample(BATCH)
    _, log_det = module.forward_and_log_det(x)
    assert_close(log_det, _brute_force_log_det(module, x))
    if not module.volume_preserving:
        assert log_det.abs().max() > 1e-3, "the zoo must use parameters with a non-trivial log-det"


def test_inverse_log_det_is_negative_and_inverse_jacobian_is_inverse(layer):
    module, shape, sample = layer
    x = sample(1)
    y, forward_log_det = module.forward_and_log_det(x)
    x_back, inverse_log_det = module.inverse_and_log_det(y.detach().clone())
    assert_close(inverse_log_det, -forward_log_det)
    assert_close(x_back, x, atol=FLOAT64_INVERSE_ATOL, rtol=0)
    if module.quantized_inverse:
        return  # the inverse rounds to the lattice: piecewise constant, no Jacobian to compare
    jac = torch.autograd.functional.jacobian(lambda v: module(v).flatten(), x).reshape(y.numel(), x.numel())
    jac_inv = torch.autograd.functional.jacobian(lambda v: module.inverse(v).flatten(), y.detach())
    jac_inv = jac_inv.reshape(x.numel(), y.numel())
    assert_close(jac_inv @ jac, torch.eye(x.numel(), dtype=torch.float64), atol=1e-7, rtol=0)


def test_fused_calls_equal_separate_calls(layer):
    module, shape, sample = layer
    x = sample(BATCH)
    y, _ = module.forward_and_log_det(x)
    assert_close(module(x), y)
    x_fused, _ = module.inverse_and_log_det(y.detach())
    assert_close(module.inverse(y.detach()), x_fused)


def _swap_parameters(module, values):
    """Put the given tensors in place of the named parameters; returns the previous ones."""
    previous = {}
    for name, value in values.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        previous[name] = owner._parameters[attribute]
        owner._parameters[attribute] = value
    return previous


def test_gradcheck_input_and_parameters(layer):
    """The forward map and log-det: every entry of the Jacobian in x (gradcheck's full mode), and in x and the
    parameters together by gradcheck's fast mode (a random projection v^T J u against its finite difference; the
    full mode would cost two evaluations per parameter entry)."""
    module, shape, sample = layer
    x = sample(2).requires_grad_(True)
    assert torch.autograd.gradcheck(module.forward_and_log_det, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    values = tuple(p.detach().clone().requires_grad_(True) for name, p in module.named_parameters() if name in names)

    def fused(x_in, *parameter_values):
        previous = _swap_parameters(module, dict(zip(names, parameter_values, strict=True)))
        try:
            return module.forward_and_log_det(x_in)
        finally:
            _swap_parameters(module, previous)

    assert torch.autograd.gradcheck(fused, (x, *values), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_gradcheck_inverse_wrt_input(layer):
    """One sample (the batch's samples are independent: test_batch_independence_of_the_inverse), in gradcheck's
    fast mode (one random projection v^T J u against its finite difference): every entry of the inverse's
    autograd Jacobian is already compared with the inverse of the forward's in
    test_inverse_log_det_is_negative_and_inverse_jacobian_is_inverse, and an iterative inverse costs two solves
    per input in the full mode."""
    module, shape, sample = layer
    if module.quantized_inverse:
        pytest.skip("the inverse rounds to the lattice: piecewise constant")
    if module.bijective:
        y = module(sample(1)).detach().requires_grad_(True)
        assert torch.autograd.gradcheck(module.inverse, (y,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    else:  # the inverse is defined on the range only: perturb along it
        x = sample(1).requires_grad_(True)
        inverse_of_image = lambda v: module.inverse(module(v))  # noqa: E731
        assert torch.autograd.gradcheck(inverse_of_image, (x,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_inverse_view(layer):
    """``m.inv`` is the inverse as a module (torch ``_InverseTransform``): ``m.inv.inv is m``, round trips."""
    module, shape, sample = layer
    inverse = module.inv
    assert inverse.inv is module
    assert type(module).__name__ in repr(inverse)
    x = sample(BATCH)
    with torch.no_grad():
        y, log_det = module.forward_and_log_det(x)
        assert_close(inverse(y.clone()), x, atol=FLOAT64_INVERSE_ATOL, rtol=0)
        assert_close(module(inverse(y.clone())), y, atol=FLOAT64_INVERSE_ATOL, rtol=0)
        assert_close(inverse.inverse(x), y)
        x_back, inverse_log_det = inverse.forward_and_log_det(y.clone())
        assert_close(inverse_log_det, -log_det)
        assert_close(inverse.inverse_and_log_det(x)[1], log_det)


def test_inverse_record_says_how_it_was_computed(layer):
    """Analytic inverses report ``ANALYTIC`` (nothing was checked); iterative ones ``SUCCESS`` with residuals."""
    module, shape, sample = layer
    with torch.no_grad():
        record = module.inverse_result(module(sample(BATCH)))
    assert record.success and record.converged.shape == (BATCH,) and record.converged.all()
    if module.analytic_inverse:
        assert record.status is SolverStatus.ANALYTIC and record.iterations == 0 and record.residual is None
    else:
        assert record.status is SolverStatus.SUCCESS and record.iterations > 0
        assert record.residual is not None and record.residual.shape == (BATCH,)


def test_batch_independence(layer):
    module, shape, sample = layer
    x = sample(4)
    with torch.no_grad():
        y = module(x)
        x_other = x.clone()
        x_other[1:] = sample(3)
        assert_close(module(x_other)[0], y[0])
        assert_close(module(x[:1])[0], y[0])


def test_batch_independence_of_the_inverse(layer):
    """A sample's inverse does not change with the batch around it (up to the solver tolerance)."""
    module, shape, sample = layer
    with torch.no_grad():
        y = module(sample(4))
        x = module.inverse(y.clone())
        y_other = y.clone()
        y_other[1:] = module(sample(3))
        assert_close(module.inverse(y_other)[0], x[0], atol=FLOAT64_INVERSE_ATOL, rtol=0)
        assert_close(module.inverse(y[:1].clone())[0], x[0], atol=FLOAT64_INVERSE_ATOL, rtol=0)


def _bad(x: torch.Tensor, bad: str) -> tuple[torch.Tensor, str]:
    if bad == "nan":
        x = x.clone()
        x[0].view(-1)[0] = float("nan")
        return x, "NaN"
    if bad == "no_batch_dim":
        return torch.tensor(1.0, dtype=torch.float64), "batch"
    return x[:0], "empty batch"


BAD_INPUTS = ["nan", "no_batch_dim", "empty_batch"]


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_input_raises_named_error(layer, bad):
    module, shape, sample = layer
    x, match = _bad(sample(BATCH), bad)
    with pytest.raises(ValueError, match=match):
        module(x)


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_input_to_the_inverse_raises_named_error(layer, bad):
    module, shape, sample = layer
    with torch.no_grad():
        y, match = _bad(module(sample(BATCH)), bad)
    with pytest.raises(ValueError, match=match):
        module.inverse(y)
    with pytest.raises(ValueError, match=match):
        module.inverse_result(y)


def test_safetensors_state_dict_round_trip(layer, layer_name):
    module, shape, sample = layer
    fresh, _, _ = build(layer_name)  # different random parameters
    payload = save(module.state_dict())  # as users will save it: no .contiguous() fix-ups
    fresh.load_state_dict(load(payload))
    x = sample(BATCH)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), atol=0, rtol=0)
    assert type(module).__name__ in repr(module)


def test_train_and_eval_agree_after_convergence(layer):
    module, shape, sample = layer
    if module.batch_statistics_in_training:
        pytest.skip("normalises with the batch's statistics in training mode")
    x = sample(BATCH)
    with torch.no_grad():
        y_eval = module(x)
        module.train()
        y_train = module(x)
        module.eval()
    assert_close(y_train, y_eval)
