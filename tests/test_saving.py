"""invertnet.save / invertnet.load: every registered builder round-trips bit-exactly; truncated, edited and
foreign files, unknown builders and hand-assembled models are refused by name."""

import json
import struct

import pytest
import torch

import invertnet
from invertnet import InvertibleSequential
from invertnet.layers import ActNorm
from invertnet.logdet import PowerSeriesLogDet, UnbiasedLogDet
from invertnet.models import FlowDistribution, standard_normal
from invertnet.models.saving import BUILDERS

IMAGE = (1, 8, 8)
DIGITS = torch.randint(0, 17, (6, *IMAGE))

# builder name -> (keyword arguments, an input for the model, how to evaluate it)
RECIPES = {
    "dense_iresnet_flow": (
        {"features": 3, "n_blocks": 2, "hidden_features": 8, "log_det": UnbiasedLogDet()},
        torch.randn(6, 3),
        "log_prob",
    ),
    "multiscale_iresnet_flow": (
        {
            "input_shape": IMAGE,
            "n_scales": 1,
            "n_blocks": 1,
            "hidden_channels": 4,
            "levels": 17,
            "log_det": PowerSeriesLogDet(3),
        },
        DIGITS,
        "log_prob",
    ),
    "mintnet_flow": (
        {
            "input_shape": IMAGE,
            "n_blocks": 2,
            "hidden_factor": 2,
            "n_squeezes": 1,
            "levels": 17,
            "dequantization": "variational",
        },
        DIGITS,
        "log_prob",
    ),
    "realnvp_flow": (
        {"features_or_shape": IMAGE, "n_scales": 1, "n_steps": 1, "hidden": 4, "levels": 17},
        DIGITS,
        "log_prob",
    ),
    "glow_flow": ({"features_or_shape": 4, "n_steps": 2, "hidden": 8}, torch.randn(6, 4), "log_prob"),
    "spline_flow": ({"features_or_shape": 3, "n_steps": 2, "hidden": 8, "bins": 4}, torch.randn(6, 3), "log_prob"),
    "iresnet_classifier": (
        {"input_shape": IMAGE, "n_blocks": 1, "hidden_channels": 4, "n_stages": 1, "pad_channels": 2},
        torch.randn(6, *IMAGE),
        "forward",
    ),
    "mintnet_classifier": (
        {"input_shape": IMAGE, "n_blocks": 2, "n_squeezes": 1, "pad_channels": 1},
        torch.randn(6, *IMAGE),
        "forward",
    ),
    "fully_invertible_classifier": (
        {"n_blocks": 1, "hidden_channels": 4, "n_stages": 1},
        torch.randn(6, *IMAGE),
        "forward",
    ),
    "conditional_dcgan": (
        {"n_classes": 3, "latent_dim": 4, "n_layers": 2, "width": 8},
        torch.tensor([0, 1, 2]),
        "sample",
    ),
    "DCGANGenerator": ({"latent_dim": 4, "n_classes": 0, "n_layers": 2, "width": 8}, torch.randn(6, 4), "forward"),
    "DCGANDiscriminator": ({"n_classes": 0, "n_layers": 2, "width": 8}, torch.randn(6, 1, 8, 8), "forward"),
    "TransposedConvGenerator": (
        {
            "latent_shape": (4, 1, 1),
            "channels": (4, 1),
            "kernel_size": 2,
            "generator": torch.Generator().manual_seed(0),
        },
        torch.randn(6, 4, 1, 1),
        "forward",
    ),
    "IsotopeNet": ({"input_length": 60}, torch.randn(6, 1, 60), "forward"),
    "ResidualNet": ({"input_length": 60}, torch.randn(6, 1, 60), "forward"),
}


def test_every_builder_has_a_recipe():
    assert set(RECIPES) == set(BUILDERS)


def _evaluate(model, x, how):
    torch.manual_seed(3)  # the same dequantisation noise and probes for both models
    return getattr(model, how)(x)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_round_trip_is_bit_exact(name, tmp_path):
    arguments, x, how = RECIPES[name]
    torch.manual_seed(0)
    model = BUILDERS[name](**arguments)
    with torch.no_grad():
        _evaluate(model, x, how)  # data-dependent initialisation, power-iteration vectors
    model.eval()
    path = invertnet.save(model, tmp_path / "model.safetensors")
    loaded = invertnet.load(path)
    assert type(loaded) is type(model) and not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert original[key].dtype == restored[key].dtype and torch.equal(original[key], restored[key]), key
    with torch.no_grad():
        assert torch.equal(_evaluate(model, x, how), _evaluate(loaded, x, how))


def test_dtype_mode_and_inverse_survive(tmp_path):
    flow = BUILDERS["dense_iresnet_flow"](features=2, n_blocks=2, hidden_features=8).double()
    flow.log_prob(torch.randn(16, 2, dtype=torch.float64))
    loaded = invertnet.load(invertnet.save(flow, tmp_path / "flow.safetensors"))
    assert loaded.training and next(loaded.parameters()).dtype == torch.float64
    flow.eval(), loaded.eval()
    z = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(flow.transform.inverse(z), loaded.transform.inverse(z))


def test_hand_assembled_models_are_refused_with_advice(tmp_path):
    flow = FlowDistribution(InvertibleSequential(ActNorm(2)), standard_normal((2,)))
    with pytest.raises(TypeError, match="state_dict"):
        invertnet.save(flow, tmp_path / "flow.safetensors")
    assert not list(tmp_path.iterdir())


def test_arguments_that_are_not_json_are_named(tmp_path):
    flow = BUILDERS["dense_iresnet_flow"](features=2, n_blocks=1, log_det=lambda g, x: (g(x), x.new_zeros(len(x))))
    with pytest.raises(TypeError, match=r"dense_iresnet_flow\(log_det=...\)"):
        invertnet.save(flow, tmp_path / "flow.safetensors")


@pytest.fixture
def saved(tmp_path):
    flow = BUILDERS["dense_iresnet_flow"](features=2, n_blocks=1, hidden_features=8)
    return invertnet.save(flow, tmp_path / "flow.safetensors")


def _header(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return data, length, json.loads(data[8 : 8 + length])


def test_truncated_file_is_refused(saved):
    saved.write_bytes(saved.read_bytes()[:-10])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        invertnet.load(saved)


def test_edited_tensor_is_refused(saved):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="changed after it was written"):
        invertnet.load(saved)


def _rewrite_metadata(path, edit):
    data, length, header = _header(path)
    edit(header["__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def test_edited_architecture_is_refused(saved):
    def widen(metadata):
        metadata["invertnet_model"] = metadata["invertnet_model"].replace(
            '"hidden_features": 8', '"hidden_features": 9'
        )

    _rewrite_metadata(saved, widen)
    with pytest.raises(ValueError, match="changed after it was written"):
        invertnet.load(saved)


def test_unknown_builder_is_refused_by_name(saved):
    def rename(metadata):
        architecture = json.loads(metadata["invertnet_model"])
        architecture["builder"] = "os.system"
        metadata["invertnet_model"] = json.dumps(architecture, sort_keys=True)
        metadata["invertnet_digest"] = "recomputed by an attacker"

    _rewrite_metadata(saved, rename)
    with pytest.raises(ValueError, match="changed after it was written"):
        invertnet.load(saved)


def test_foreign_and_missing_files_are_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="holds no invertnet model"):
        invertnet.load(tmp_path / "other.safetensors")
    (tmp_path / "text.safetensors").write_text("not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        invertnet.load(tmp_path / "text.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        invertnet.load(tmp_path / "missing.safetensors")


def test_a_failed_write_keeps_the_old_file(saved, monkeypatch):
    before = saved.read_bytes()
    import invertnet.models.saving as saving

    def full_disk(tensors, path, metadata=None):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "save_tensors", full_disk)
    with pytest.raises(OSError, match="No space"):
        invertnet.save(BUILDERS["dense_iresnet_flow"](features=2, n_blocks=1), saved)
    assert saved.read_bytes() == before and [p.name for p in saved.parent.iterdir()] == [saved.name]


@pytest.mark.parametrize("estimator", ["PowerSeriesLogDet", "UnbiasedLogDet", "ExactLogDet", "DenseExactLogDet"])
def test_every_estimator_is_saved_with_its_arguments(estimator, tmp_path):
    import invertnet.logdet as logdet

    chosen = getattr(logdet, estimator)()
    flow = BUILDERS["dense_iresnet_flow"](features=2, n_blocks=1, hidden_features=4, log_det=chosen)
    loaded = invertnet.load(invertnet.save(flow, tmp_path / "flow.safetensors"))
    restored = loaded.residual_blocks()[0].log_det_estimator
    assert type(restored) is type(chosen) and vars(restored) == vars(chosen)


def test_a_conditional_flow_round_trips_with_its_image_context(tmp_path):
    from invertnet.models import realnvp_flow

    torch.manual_seed(0)
    flow = realnvp_flow(IMAGE, n_scales=1, n_steps=1, hidden=4, levels=17, context_shape=(1, 4, 4))
    context = torch.randn(6, 1, 4, 4)
    with torch.no_grad():
        flow.log_prob(DIGITS, context=context)  # data-dependent initialisation
    flow.eval()
    loaded = invertnet.load(invertnet.save(flow, tmp_path / "conditional.safetensors"))
    assert loaded.context_shape == (1, 4, 4)
    torch.manual_seed(3)
    expected = flow.log_prob(DIGITS, context=context)
    torch.manual_seed(3)
    assert torch.equal(loaded.log_prob(DIGITS, context=context), expected)
