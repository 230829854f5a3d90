"""Bad input, named (issue 15): every case gives an error naming what is wrong, where, the value and what is
accepted, or a documented behaviour (empty samples) instead of a traceback from deep inside torch or numpy."""

from __future__ import annotations

import gzip
import pickle
import re
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from invertnet import InvertibleSequential
from invertnet.app.cli import main
from invertnet.app.config import load_config
from invertnet.app.kinds import PARAMETER_BUDGET_VARIABLE, ParameterBudget
from invertnet.data import MAX_CLASSES, load_cifar10, load_image_folder, load_mnist, read_idx, read_imzml
from invertnet.layers import ActNorm, InvertibleResidual, LipschitzMLP, MintLayer
from invertnet.models import dense_iresnet_flow, mintnet_flow, multiscale_iresnet_flow

from .zoo import ZOO, build

# ---- 1. empty batches ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "data_shape"),
    [
        (lambda: dense_iresnet_flow((2,), n_blocks=1), (2,)),
        (lambda: multiscale_iresnet_flow((1, 8, 8), levels=17, n_blocks=1), (1, 8, 8)),
        (lambda: mintnet_flow((1, 8, 8), levels=17, n_blocks=2, n_squeezes=1), (1, 8, 8)),
    ],
)
def test_sampling_no_samples_gives_an_empty_tensor_of_the_data_shape(make, data_shape):
    flow = make()
    samples = flow.sample((0,))
    assert samples.shape == (0, *data_shape) and samples.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_layer_refuses_an_empty_batch_by_name(name):
    module, shape, sample = build(name)
    empty = torch.zeros(0, *shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\.(forward|forward_and_log_det): expected at least one sample.*empty batch"):
        module.forward_and_log_det(empty)
    latent_shape = module(sample(2)).shape[1:]
    with pytest.raises(ValueError, match=r"expected at least one sample.*empty batch"):
        module.inverse(torch.zeros(0, *latent_shape, dtype=torch.float64))


def test_sample_command_refuses_no_samples(tmp_path):
    result = CliRunner().invoke(main, ["sample", str(tmp_path), "-n", "0"])
    assert result.exit_code == 2 and "Invalid value for '-n': 0 is not in the range x>=1" in result.output


# ---- 2. dtypes -----------------------------------------------------------------------------------------------


def test_an_input_of_another_dtype_than_the_model_is_named():
    flow = dense_iresnet_flow((2,), n_blocks=1)
    message = "the input is torch.float64 but the model's parameters are torch.float32"
    with pytest.raises(ValueError, match=re.escape(f"FlowDistribution.log_prob: {message}")):
        flow.log_prob(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape(f"InvertibleSequential.inverse: {message}")):
        flow.transform.inverse(torch.zeros(3, 2, dtype=torch.float64))
    block = InvertibleResidual(LipschitzMLP(2, 8, n_layers=2)).double()
    with pytest.raises(ValueError, match="InvertibleResidual.inverse: the input is torch.float32 .* are torch.float64"):
        block.inverse(torch.zeros(3, 2))
    sequential = InvertibleSequential(ActNorm(2)).double()
    with pytest.raises(ValueError, match="InvertibleSequential.forward_and_log_det: the input is torch.float32"):
        sequential.forward_and_log_det(torch.zeros(3, 2))
    assert flow.log_prob(torch.zeros(3, 2)).shape == (3,)  # the model's own dtype passes
    with pytest.raises(ValueError, match="InvertibleResidual.forward: the input is torch.float32"):
        block(torch.zeros(3, 2))  # a layer used on its own, outside a sequential
    layer = MintLayer(1, hidden_factor=1).double()
    with pytest.raises(ValueError, match="MintLayer.forward: the input is torch.float32 .* are torch.float64"):
        layer(torch.zeros(2, 1, 4, 4))


# ---- 3. and 4. labels and pixel values of data files ---------------------------------------------------------


def _cifar(root, data, labels):
    with open(root / "test_batch", "wb") as handle:
        pickle.dump({b"data": data, b"labels": labels}, handle, protocol=2)


def _pixels(value=0.0, dtype=np.uint8):
    data = np.zeros((2, 3072), dtype=dtype)
    data[1, 5] = value
    return data


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, -3], "labels must be class indices >= 0, got -3"),
        (
            [0, 1_000_000],
            f"the largest label is 1000000, which would make a classifier of 1,000,001 classes; labels are "
            f"class indices 0..{MAX_CLASSES - 1}",
        ),
        ([0, 1.5], "labels must be integers, but 1 are not (the first is 1.5)"),
        ([0, float("nan")], "1 labels are NaN or infinite"),
        (["cat", "dog"], "labels must be numbers"),
    ],
)
def test_cifar_labels_outside_the_class_indices_are_named(tmp_path, labels, message):
    _cifar(tmp_path, _pixels(), labels)
    with pytest.raises(ValueError, match=re.escape(f"CIFAR-10 batch {tmp_path / 'test_batch'}: {message}")):
        load_cifar10(tmp_path, "test")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_pixels(1000.0, np.float64), "pixel values must be integer levels 0..255, got values from 0 to 1000"),
        (_pixels(-1, np.int64), "got values from -1 to 0"),
        (_pixels(np.nan, np.float32), "1 pixel values are NaN or infinite"),
        (_pixels(0.5, np.float32), "pixel values must be integers, but 1 are not (the first is 0.5)"),
    ],
)
def test_cifar_pixel_values_are_checked_not_cast(tmp_path, data, message):
    _cifar(tmp_path, data, [0, 1])
    with pytest.raises(ValueError, match=re.escape(message)):
        load_cifar10(tmp_path, "test")


def test_cifar_integer_valued_floats_load(tmp_path):
    _cifar(tmp_path, _pixels(255.0, np.float64), [0, 1.0])
    images, labels = load_cifar10(tmp_path, "test")
    assert images.max() == 255 and labels.tolist() == [0, 1] and labels.dtype == torch.long


def _idx(array: np.ndarray, code: int) -> bytes:
    return struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_mnist_values_outside_levels_and_labels_are_named(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(np.full((2, 28, 28), 300, dtype=">i4"), 0x0C))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.array([1, -3], dtype=np.int8), 0x09))
    with pytest.raises(
        ValueError,
        match=r"t10k-images-idx3-ubyte: pixel values must be integer levels 0..255, got "
        "values from 300 to 300",
    ):
        load_mnist(tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((2, 28, 28), dtype=np.uint8), 0x08))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: labels must be class indices >= 0, got -3"):
        load_mnist(tmp_path, "test")


def test_imzml_labels_beyond_the_class_limit_are_named(tmp_path):
    from pyimzml.ImzMLWriter import ImzMLWriter

    path = tmp_path / "tiny.imzML"
    with ImzMLWriter(str(path), mode="continuous") as writer:
        for x in (1, 2):
            writer.addSpectrum(np.linspace(800.0, 900.0, 5), np.ones(5, dtype=np.float32), (x, 1))
    table = tmp_path / "labels.csv"
    table.write_text("x,y,label\n1,1,0\n2,1,1000000\n")
    with pytest.raises(ValueError, match=re.escape(f"labels file {table}: the largest label is 1000000")):
        read_imzml(path, labels=table)


# ---- 5. files ------------------------------------------------------------------------------------------------


def test_corrupt_gzip_files_are_named(tmp_path):
    payload = gzip.compress(_idx(np.zeros((4, 28, 28), dtype=np.uint8), 0x08))
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{truncated}: corrupt or truncated gzip file")):
        read_idx(truncated)
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"\x1f\x8b" + bytes(range(200)))
    with pytest.raises(ValueError, match=re.escape(f"{garbage}: corrupt or truncated gzip file")):
        read_idx(garbage)


def test_a_gzip_bomb_is_refused_after_its_header_in_bounded_memory(tmp_path):
    header = _idx(np.zeros((2, 28, 28), dtype=np.uint8), 0x08)
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as handle:  # 64 MB of zeros after a header announcing 1568 bytes
        handle.write(header)
        for _ in range(64):
            handle.write(bytes(1 << 20))
    assert bomb.stat().st_size < 1_000_000
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"announces shape \(2, 28, 28\) \(1568 data bytes\) but the file holds more"):
        read_idx(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5_000_000
    huge = tmp_path / "huge.gz"
    huge.write_bytes(gzip.compress(struct.pack(">BBBBIII", 0, 0, 0x08, 3, 60_000, 60_000, 1000)))
    with pytest.raises(ValueError, match=r"announces shape \(60000, 60000, 1000\) \(3600000000000 bytes\), more than"):
        read_idx(huge)


def _png(path, width, height):
    """A PNG header announcing width x height 8-bit grey pixels, with no image data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("side", [20_000, 10_000])  # beyond twice pillow's limit (its own error), and between
def test_decompression_bombs_are_refused_with_the_file_name(tmp_path, side):
    pytest.importorskip("PIL")
    for name in ("a.png", "b.png"):
        _png(tmp_path / name, side, side)
    with pytest.raises(ValueError, match=r"load_image_folder: .*[ab]\.png .*89,478,485 .*max_pixels"):
        load_image_folder(tmp_path, "test")


def test_sixteen_bit_images_are_refused_not_clipped(tmp_path):
    image = pytest.importorskip("PIL.Image")
    for name in ("a.png", "b.png"):
        image.fromarray(np.full((8, 8), 40_000, dtype=np.uint16)).save(tmp_path / name)
    with pytest.raises(ValueError, match=r"[ab]\.png holds 'I.*' values \(16-bit or floating point\)"):
        load_image_folder(tmp_path, "test")


def _tiny_imzml(tmp_path):
    from pyimzml.ImzMLWriter import ImzMLWriter

    path = tmp_path / "tiny.imzML"
    with ImzMLWriter(str(path), mode="continuous") as writer:
        for x in (1, 2, 3):
            writer.addSpectrum(np.linspace(800.0, 900.0, 5), np.ones(5, dtype=np.float32), (x, 1))
    return path


@pytest.mark.parametrize(
    ("occurrence", "shift", "message"),
    [
        (1, 2, "places the intensity array of spectrum 1 at byte 76, inside the intensity array of spectrum 0"),
        (0, -10, "places the m/z array of spectrum 0 at byte 6, inside the 16-byte UUID (bytes up to 16)"),
        (5, 10_000, "is truncated: 116 bytes, but tiny.imzML points to data up to byte 10116"),
    ],
)
def test_imzml_offsets_outside_the_binary_or_misaligned_are_named(tmp_path, occurrence, shift, message):
    path = _tiny_imzml(tmp_path)  # offsets: m/z 16 (shared), intensities 56, 76, 96; file of 116 bytes
    text = path.read_text()
    matches = list(re.finditer(r'name="external offset" value="(\d+)"', text))
    target = matches[occurrence]
    value = int(target.group(1)) + shift
    path.write_text(text[: target.start(1)] + str(value) + text[target.end(1) :])
    with pytest.raises(ValueError, match=re.escape(message)):
        read_imzml(path)


# ---- 6. sizes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_blocks=1e9", "model.n_blocks: Input should be less than or equal to 1000 (got 1000000000.0)"),
        ("model.n_terms=1e9", "model.n_terms: Input should be less than or equal to 200 (got 1000000000.0)"),
        ("evaluation.max_terms=1e9", "evaluation.max_terms: Input should be less than or equal to 5000"),
        ("model.hidden_features=1e9", "model.hidden_features: Input should be less than or equal to 65536"),
        ("train.steps=1e12", "train.steps: Input should be less than or equal to 1000000000"),
        ("train.seed=1180591620717411303424", "train.seed: seed must be an integer with 0 <= seed < 2^62"),
        ("train.seed=-1", "(torch's seeds are 64-bit integers and the Trainer adds the step to it), got -1"),
        ("model.coeff=1.5", "model.coeff: Input should be less than 1 (got 1.5)"),
        ("model.coeff=0", "model.coeff: Input should be greater than 0 (got 0)"),
    ],
)
def test_sizes_and_seeds_beyond_their_limits_are_refused_by_the_config(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config("digits_dense", [override])


def test_a_model_above_the_parameter_budget_is_refused_before_it_is_allocated(tmp_path):
    overrides = ["--set", "model.hidden_features=30000", "--set", "model.n_blocks=100"]
    result = CliRunner().invoke(
        main, ["train", "--config", "digits_dense", *overrides, "--run-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == 1
    assert re.search(
        r"model kind 'dense': these settings ask for more than [\d,]+ parameters and buffers \([\d.e+]+ bytes, refused "
        r"before allocating the tensor of shape \(30000, 30000\)\), above the budget of 2e\+09 bytes",
        result.output,
    ), result.output
    assert PARAMETER_BUDGET_VARIABLE in result.output and not (tmp_path / "r").exists()


def test_the_parameter_budget_is_set_by_its_environment_variable(monkeypatch):
    from invertnet.app.runs import build as build_run

    config = load_config("digits_dense", ["model.n_blocks=1"])
    monkeypatch.setenv(PARAMETER_BUDGET_VARIABLE, "1e4")
    with pytest.raises(ValueError, match=r"above the budget of 1e\+04 bytes"):
        build_run(config)
    monkeypatch.setenv(PARAMETER_BUDGET_VARIABLE, "lots")
    with pytest.raises(ValueError, match=f"{PARAMETER_BUDGET_VARIABLE}: expected a positive number of bytes"):
        build_run(config)
    monkeypatch.setenv(PARAMETER_BUDGET_VARIABLE, "1e9")
    _, model, _ = build_run(config)
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with ParameterBudget("dense", budget=size * 1.01) as budget:  # the count is the model's size, to 1 %
        build_run(config)
    assert 0.99 * size <= budget.requested <= 1.01 * size
