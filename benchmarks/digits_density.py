"""Density estimation on scikit-learn's 8x8 digits: invertnet's flows against zuko and normflows.

Run from the repository root::

    .venv/bin/python benchmarks/digits_density.py [--budget SECONDS]

Progress and a table go to stderr, one JSON object to stdout. Every model trains for the same wall-clock
budget (default 60 s) on the CPU with torch's default number of threads, then is evaluated on the test split.

* invertnet: the embedded configs ``digits_dense`` (dense i-ResNet), ``mintnet_digits`` (MintNet) and
  ``digits`` (multi-scale i-ResNet, the ``make run`` model), each with its own dequantisation and logit,
  trained with the config's optimiser settings through ``Trainer.train_step`` (``steps`` made so large that
  the cosine schedule stays at its initial rate). Evaluated in eval mode with the EMA weights, after
  ``refine_spectral_norms`` (as ``invertnet evaluate`` does) and with ``ExactLogDet`` in every block, so the
  number carries neither the truncation bias nor the probe noise of the training estimator.
* peers, on the data flattened to 64 dimensions, dequantised as x = (levels + U[0, 1)) / 17 and mapped by
  the same logit as invertnet's (alpha = 0.05, its log-det included), trained with Adam (lr 1e-3, batch 64):
  zuko MAF and NSF (a peer whose library is missing is reported as an error), normflows RealNVP (masked
  affine couplings on alternating checkerboard masks, ActNorm between), normflows Glow (on the images
  squeezed to 4x4x4) and normflows' residual flow
  (``Residual(LipschitzMLP)``, ActNorm between, ``update_lipschitz`` after every step and to convergence
  before evaluation; evaluated with its own unbiased eval-mode estimator). The hidden width of each peer is
  chosen so that its parameter count is closest to that of ``digits_dense``.

Test bits/dim are with respect to the discrete data, -log p(levels + u) / (64 ln 2), averaged per test image
over 4 dequantisation draws; ``standard_error`` is over test images.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from invertnet.app.config import load_config
from invertnet.app.runs import build
from invertnet.data import DIGITS_LEVELS, load_digits
from invertnet.layers import InvertibleResidual, refine_spectral_norms
from invertnet.logdet import ExactLogDet
from invertnet.training import TrainConfig, Trainer

DIM = 64
DRAWS = 4
LOGIT_ALPHA = 0.05
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
EVAL_BATCH = 256
REPORT_EVERY = 10.0
#: Peers get the parameter count of this invertnet config.
PEER_SIZE_CONFIG = "digits_dense"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def standard_error(values: Tensor) -> float:
    return (values.std() / math.sqrt(len(values))).item()


def train_for(budget: float, step: Callable[[], float], name: str) -> tuple[int, float]:
    """Call ``step`` until ``budget`` seconds have passed; returns (steps, seconds)."""
    start = last_report = time.perf_counter()
    steps = 0
    while (now := time.perf_counter()) - start < budget:
        loss = step()
        steps += 1
        if now - last_report >= REPORT_EVERY:
            log(f"  {name}: step {steps}, {now - start:.0f} s, train bits/dim {loss:.3f}")
            last_report = now
    return steps, time.perf_counter() - start


def averaged_bits(bits: Callable[[Tensor], Tensor], test: Tensor) -> Tensor:
    """Per-image test bits/dim, averaged over ``DRAWS`` dequantisation draws."""
    draws = [torch.cat([bits(chunk) for chunk in test.split(EVAL_BATCH)]) for _ in range(DRAWS)]
    return torch.stack(draws).mean(dim=0)


# invertnet


def run_invertnet(budget: float, config_name: str) -> dict:
    """Train an embedded config for ``budget`` seconds and evaluate it with an exact (or bias-free) log-det."""
    config = load_config(config_name)
    torch.manual_seed(config.train.seed)
    _, flow, data = build(config)
    train, test = data.train, data.test
    settings = TrainConfig(**{**config.train.model_dump(), "steps": 10**9})
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(flow, train, settings, run_dir, progress=False)
        steps, seconds = train_for(budget, trainer.train_step, config_name)
        flow.eval()
        with trainer.ema_weights(), torch.no_grad():
            refine_spectral_norms(flow)
            for block in flow.modules():
                if isinstance(block, InvertibleResidual):
                    block.use_log_det_estimator(ExactLogDet())
            bits = averaged_bits(flow.bits_per_dim, test)
    return result(flow, steps, seconds, bits, INVERTNET_MODELS[config_name])


INVERTNET_MODELS = {
    "digits_dense": "dense i-ResNet on flattened digits, config 'digits_dense'",
    "mintnet_digits": "MintNet (grouped masked-conv layers), config 'mintnet_digits'",
    "digits": "multiscale i-ResNet, config 'digits' (make run)",
}


# peers: densities of logit-space vectors y with log_prob(y) of shape (B,)


def dequantize(levels: Tensor) -> Tensor:
    """(levels + U[0, 1)) / K, flattened: the data in [0, 1)^64."""
    return ((levels + torch.rand_like(levels)) / DIGITS_LEVELS).flatten(1)


def to_logit(x: Tensor) -> tuple[Tensor, Tensor]:
    """y = logit(alpha + (1 - 2 alpha) x) and log|det dy/dx| per sample."""
    p = LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * x
    y = torch.log(p) - torch.log1p(-p)
    return y, (math.log(1 - 2 * LOGIT_ALPHA) - torch.log(p) - torch.log1p(-p)).sum(dim=1)


def bits_per_dim(model: nn.Module, levels: Tensor) -> Tensor:
    """-log p(levels + u) / (64 ln 2) per sample: bits/dim w.r.t. the discrete data, for one draw of u."""
    y, log_det = to_logit(dequantize(levels))
    log_density = model.log_prob(y) + log_det - DIM * math.log(DIGITS_LEVELS)
    return -log_density / (DIM * math.log(2))


class ZukoDensity(nn.Module):
    """An unconditional zuko flow with a ``log_prob`` method."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def log_prob(self, y: Tensor) -> Tensor:
        return self.flow().log_prob(y)


def zuko_maf(width: int) -> nn.Module:
    import zuko

    return ZukoDensity(zuko.flows.MAF(DIM, transforms=3, hidden_features=(width, width)))


def zuko_nsf(width: int) -> nn.Module:
    import zuko

    return ZukoDensity(zuko.flows.NSF(DIM, bins=4, transforms=2, hidden_features=(width, width)))


def normflows_realnvp(width: int) -> nn.Module:
    import normflows as nf

    row, column = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    mask = ((row + column) % 2).flatten().float()
    flows = []
    for i in range(4):
        scale = nf.nets.MLP([DIM, width, width, DIM], init_zeros=True)
        shift = nf.nets.MLP([DIM, width, width, DIM], init_zeros=True)
        flows += [nf.flows.MaskedAffineFlow(mask if i % 2 == 0 else 1 - mask, shift, scale), nf.flows.ActNorm(DIM)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(DIM, trainable=False), flows)


class ImageDensity(nn.Module):
    """A normflows image flow over (1, 8, 8) with a ``log_prob`` of flat 64-vectors."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def log_prob(self, y: Tensor) -> Tensor:
        return self.flow.log_prob(y.view(-1, 1, 8, 8))


def normflows_glow(width: int) -> nn.Module:
    import normflows as nf

    blocks = [nf.flows.GlowBlock(4, width, split_mode="channel") for _ in range(4)]
    base = nf.distributions.DiagGaussian((4, 4, 4), trainable=False)
    return ImageDensity(nf.NormalizingFlow(base, [*blocks, nf.flows.Squeeze()]))


def normflows_residual(width: int) -> nn.Module:
    import normflows as nf

    flows = []
    for _ in range(4):
        net = nf.nets.LipschitzMLP([DIM, width, width, DIM], lipschitz_const=0.97, init_zeros=True)
        flows += [nf.flows.Residual(net, reduce_memory=True), nf.flows.ActNorm(DIM)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(DIM, trainable=False), flows)


def update_lipschitz(iterations: int) -> Callable[[nn.Module], None]:
    def update(model: nn.Module) -> None:
        import normflows as nf

        nf.utils.update_lipschitz(model, iterations)

    return update


def unchanged(model: nn.Module) -> None:
    pass


@dataclass
class Peer:
    name: str
    build: Callable[[int], nn.Module]
    architecture: str
    after_step: Callable[[nn.Module], None] = unchanged
    before_eval: Callable[[nn.Module], None] = unchanged


PEERS = [
    Peer("zuko MAF", zuko_maf, "3 affine MADE transforms, 2 hidden layers"),
    Peer("zuko NSF", zuko_nsf, "2 autoregressive RQ-spline transforms (4 bins), 2 hidden layers"),
    Peer(
        "normflows RealNVP",
        normflows_realnvp,
        "4 masked affine couplings (checkerboard), s/t MLPs with 2 hidden layers",
    ),
    Peer(
        "normflows Glow",
        normflows_glow,
        "squeeze to 4x4x4, 4 Glow blocks (affine coupling with 3x3-1x1-3x3 conv net, 1x1 conv, ActNorm)",
    ),
    Peer(
        "normflows residual",
        normflows_residual,
        "4 Residual(LipschitzMLP, 2 hidden layers) blocks, unbiased log-det",
        after_step=update_lipschitz(5),
        before_eval=update_lipschitz(200),
    ),
]


def matched_width(build: Callable[[int], nn.Module], target: int) -> int:
    """The hidden width whose model's parameter count is closest to ``target``."""
    width = 1
    while (count := parameter_count(build(width))) < target:
        width += 1
    if width > 1 and target - parameter_count(build(width - 1)) < count - target:
        return width - 1
    return width


def batches(data: Tensor, size: int) -> Iterator[Tensor]:
    """Shuffled batches, epoch after epoch."""
    while True:
        order = torch.randperm(len(data))
        for start in range(0, len(order) - size + 1, size):
            yield data[order[start : start + size]]


def run_peer(peer: Peer, target: int, budget: float, train: Tensor, test: Tensor) -> dict:
    torch.manual_seed(0)
    width = matched_width(peer.build, target)
    model = peer.build(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    stream = batches(train, BATCH_SIZE)

    def step() -> float:
        model.train()
        loss = bits_per_dim(model, next(stream)).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        peer.after_step(model)
        return loss.item()

    steps, seconds = train_for(budget, step, peer.name)
    model.eval()
    peer.before_eval(model)
    with torch.no_grad():
        bits = averaged_bits(lambda chunk: bits_per_dim(model, chunk), test)
    return result(model, steps, seconds, bits, f"{peer.architecture}, width {width}")


def result(model: nn.Module, steps: int, seconds: float, bits: Tensor, architecture: str) -> dict:
    return {
        "architecture": architecture,
        "parameters": parameter_count(model),
        "steps": steps,
        "seconds": round(seconds, 2),
        "test_bits_per_dim": bits.mean().item(),
        "standard_error": standard_error(bits),
    }


def guarded(name: str, run: Callable[[], dict]) -> dict:
    log(f"{name} ...")
    try:
        return {"model": name, **run()}
    except Exception as error:  # one failing model is reported, the others still run
        log(f"  {name} failed: {type(error).__name__}: {error}")
        return {"model": name, "error": f"{type(error).__name__}: {error}"}


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<24} {'params':>8} {'steps':>7} {'seconds':>8} {'test bits/dim':>14} {'s.e.':>7}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['model']:<24} error: {row['error']}")
        else:
            lines.append(
                f"{row['model']:<24} {row['parameters']:>8} {row['steps']:>7} {row['seconds']:>8.1f} "
                f"{row['test_bits_per_dim']:>14.4f} {row['standard_error']:>7.4f}"
            )
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in ("invertnet", "torch", "zuko", "normflows"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per model")
    budget = parser.parse_args().budget
    train, test = load_digits("train")[0], load_digits("test")[0]
    target = parameter_count(build(load_config(PEER_SIZE_CONFIG))[1])
    rows = [guarded(f"invertnet {name}", lambda name=name: run_invertnet(budget, name)) for name in INVERTNET_MODELS]
    for peer in PEERS:
        rows.append(guarded(peer.name, lambda peer=peer: run_peer(peer, target, budget, train, test)))
    log(table(rows))
    output = {
        "budget_seconds": budget,
        "threads": torch.get_num_threads(),
        "data": {"train": len(train), "test": len(test), "levels": DIGITS_LEVELS, "dequantisation_draws": DRAWS},
        "versions": versions(),
        "models": rows,
    }
    print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
