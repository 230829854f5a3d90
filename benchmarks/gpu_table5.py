"""Table 5 of Behrmann et al. 2019 (i-ResNet) on a CUDA GPU: time of one forward + backward pass of a batch of 128
CIFAR-10-sized images (3x32x32) for Glow, an i-ResNet, an i-ResNet with spectral normalisation and an i-ResNet
with spectral normalisation and the log-det, eagerly and under ``torch.compile``.

Run from the repository root on a machine with a GPU::

    .venv/bin/python benchmarks/gpu_table5.py                 # full table, eager and compiled
    .venv/bin/python benchmarks/gpu_table5.py --no-compile    # eager only
    .venv/bin/python benchmarks/gpu_table5.py --smoke         # tiny models, one untimed step each (any device)

Without a GPU it prints that none is present and exits with status 0: this is a GPU benchmark, and CPU times of
these models say nothing about Table 5. One JSON object goes to stdout, progress to stderr.

Models (float32, training mode, 8-bit data: uniform dequantisation and the logit transform first):

* ``glow``: :func:`invertnet.models.glow_flow` with Kingma & Dhariwal's CIFAR-10 sizes (L = 3 levels, K = 32
  steps, 512 hidden channels), all dimensions kept to the end (no factoring out). Loss: -log p(x) (exact log-det).
* ``iresnet``: the embedded ``cifar10`` config's multi-scale i-ResNet (3 scales x 32 blocks, 512 hidden channels,
  3-1-3 kernels) with every spectrally normalised convolution replaced by a plain ``nn.Conv2d`` holding the same
  weights. Loss: |F(x)|^2 / 2 (the base's term; no log-det).
* ``iresnet_sn``: the same flow with spectral normalisation (one power iteration per layer per step). Same loss.
* ``iresnet_sn_logdet``: the same with the log-det of the config's training estimator (power series, 5 terms):
  loss -log p(x).

Each measurement: ``--warmup`` untimed steps, then ``--repeats`` steps each between ``torch.cuda.synchronize()``
calls and timed by CUDA events (``Event.elapsed_time``); median and mean in milliseconds, and the peak of
``torch.cuda.max_memory_allocated``. Value checks are off (``invertnet.validation(False)``): each is a
device-to-host synchronisation in eager code, and compiled code has none. The compiled column compiles the loss
function (``torch.compile``, default mode; its backward is compiled by AOTAutograd) after one eager call
(ActNorm's data-dependent initialisation); ``compile_seconds`` is the wall time of the first compiled step. A
model that runs out of memory is reported with the error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from copy import deepcopy

import torch
from torch import Tensor, nn

import invertnet
from invertnet.app.config import load_config
from invertnet.layers import SpectralNormConv2d
from invertnet.models import FlowDistribution, glow_flow

SHAPE = (3, 32, 32)
LEVELS = 256
MODELS = ("glow", "iresnet", "iresnet_sn", "iresnet_sn_logdet")
#: Sizes of the full table and of the smoke run (tiny models that exercise the same code on any device).
GLOW_SIZES = {
    "full": {"n_scales": 3, "n_steps": 32, "hidden": 512},
    "smoke": {"n_scales": 3, "n_steps": 1, "hidden": 8},
}
IRESNET_OVERRIDES = {"full": [], "smoke": ["model.n_scales=2", "model.n_blocks=1", "model.hidden_channels=8"]}

Loss = Callable[[Tensor], Tensor]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def without_spectral_norm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every :class:`~invertnet.layers.SpectralNormConv2d` replaced by an ``nn.Conv2d``
    with the same (unnormalised) weight and bias: the same architecture without spectral normalisation."""
    plain = deepcopy(module)
    for parent in plain.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, SpectralNormConv2d):
                conv = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    bias=child.bias is not None,
                ).to(child.weight.device)
                with torch.no_grad():
                    conv.weight.copy_(child.weight)
                    if child.bias is not None:
                        conv.bias.copy_(child.bias)
                setattr(parent, name, conv)
    return plain


def iresnet_flow(size: str) -> FlowDistribution:
    """The embedded ``cifar10`` config's multi-scale i-ResNet (with its training log-det estimator)."""
    model = load_config("cifar10", IRESNET_OVERRIDES[size]).model
    return model.builder(SHAPE, levels=LEVELS, **model.builder_arguments())


def losses(size: str, device: torch.device) -> dict[str, tuple[nn.Module, Loss]]:
    """Each row of the table: the module whose parameters train and its loss of a batch of levels."""
    glow = glow_flow(SHAPE, levels=LEVELS, **GLOW_SIZES[size]).to(device)
    with_sn = iresnet_flow(size).to(device)
    plain = without_spectral_norm(with_sn.transform)
    return {
        "glow": (glow, lambda x: -glow.log_prob(x).mean()),
        "iresnet": (plain, lambda x: 0.5 * plain(x).pow(2).flatten(1).sum(dim=1).mean()),
        "iresnet_sn": (with_sn, lambda x: 0.5 * with_sn.transform(x).pow(2).flatten(1).sum(dim=1).mean()),
        "iresnet_sn_logdet": (with_sn, lambda x: -with_sn.log_prob(x).mean()),
    }


def _step(module: nn.Module, loss: Loss, x: Tensor) -> float:
    module.zero_grad(set_to_none=True)
    value = loss(x)
    value.backward()
    return float(value.detach())


def _timed_steps(module: nn.Module, loss: Loss, x: Tensor, warmup: int, repeats: int) -> dict[str, float]:
    """Median and mean milliseconds of ``repeats`` forward + backward steps (CUDA events), after ``warmup``."""
    for _ in range(warmup):
        _step(module, loss, x)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        module.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start.record()
        loss(x).backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
    }


def measure(name: str, module: nn.Module, loss: Loss, x: Tensor, arguments: argparse.Namespace) -> dict[str, object]:
    """The row of one model: parameters, eager and (unless ``--no-compile``) compiled timings."""
    row: dict[str, object] = {"parameters": sum(p.numel() for p in module.parameters())}
    _step(module, loss, x)  # ActNorm's data-dependent initialisation, eagerly
    columns: dict[str, Loss] = {"eager": loss}
    if not arguments.no_compile:
        columns["compiled"] = torch.compile(loss)
    for column, function in columns.items():
        _log(f"{name}: {column}")
        try:
            started = time.perf_counter()
            _step(module, function, x)
            torch.cuda.synchronize()
            first = time.perf_counter() - started
            row[column] = _timed_steps(module, function, x, arguments.warmup, arguments.repeats)
            if column == "compiled":
                row[column]["compile_seconds"] = first  # type: ignore[index]
        except torch.cuda.OutOfMemoryError as error:
            row[column] = {"error": f"out of memory: {error}".splitlines()[0]}
            torch.cuda.empty_cache()
    return row


def smoke() -> dict[str, object]:
    """One untimed eager step of each tiny model on the available device: the code path, not the times."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randint(0, LEVELS, (2, *SHAPE), device=device).float()
    rows = {}
    for name, (module, loss) in losses("smoke", device).items():
        _step(module, loss, x)
        value = _step(module, loss, x)
        finite = all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
        rows[name] = {"loss": value, "finite_gradients": bool(finite)}
    return {"smoke": True, "device": str(device), "models": rows}


def table(arguments: argparse.Namespace) -> dict[str, object]:
    device = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randint(0, LEVELS, (arguments.batch_size, *SHAPE), device=device).float()
    models = losses("full", device)
    rows = {name: measure(name, *models[name], x, arguments) for name in arguments.models}
    return {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "invertnet": invertnet.__version__,
        "batch_size": arguments.batch_size,
        "shape": list(SHAPE),
        "warmup": arguments.warmup,
        "repeats": arguments.repeats,
        "models": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--no-compile", action="store_true", help="eager column only")
    parser.add_argument("--smoke", action="store_true", help="tiny models, one untimed step each, on any device")
    arguments = parser.parse_args(argv)
    with invertnet.validation(False):
        if arguments.smoke:
            print(json.dumps(smoke(), indent=2))
            return 0
        if not torch.cuda.is_available():
            print("no CUDA GPU is present: Table 5 times GPU training steps, so nothing was measured")
            return 0
        print(json.dumps(table(arguments), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
