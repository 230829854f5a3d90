"""Memory-saving training of deep flows: memory kept for backward, peak RSS, time per step, gradient agreement.

Run from the repository root::

    .venv/bin/python benchmarks/memory_saving.py [--depths 4 8 16 32] [--batch 16] [--steps 3] [--threads 1]

Progress and a markdown table go to stderr, one JSON object to stdout. Every (model, depth, mode) runs in its
own process (peak RSS is a per-process high-water mark), one after the other, on the CPU in float32, in
training mode, on random 8-bit 1x28x28 images (256 levels: uniform dequantisation and logit first). Each
process uses ``--threads`` torch threads (default 1: on a shared machine with more threads than free cores,
an i-ResNet block's step was measured 50x slower).

Models, ``depth`` = number of blocks:

* ``iresnet``: ``multiscale_iresnet_flow`` with 2 scales of depth / 2 blocks, 16 hidden channels, the default
  log-det (power series, 10 terms, one Gaussian probe);
* ``mintnet``: ``mintnet_flow`` with ``depth`` grouped layers, hidden_factor 8, two squeezes, ActNorm.

Modes: ``ordinary`` (the flow as built) and ``memory_saving`` (its parts in a ``MemorySavingSequential``).

Measured per process, from the same seed (same initial weights, batch and random draws in both modes):

* ``saved_mb``: bytes of the distinct storages the graph keeps for backward after the forward pass
  (``saved_activation_bytes``: ``saved_tensors_hooks``, parameters and buffers excluded);
* ``peak_tensor_mb``: high-water mark of the bytes of tensors allocated during a forward and backward pass
  and not yet freed (``torch.profiler`` allocation events, as in ``benchmarks/iresnet_block.py``). It includes
  the parameter gradients and the power-iteration vectors the step replaces (their predecessors were allocated
  before profiling, so their frees are not seen); both grow with depth in either mode;
* ``rss_growth_mb``: growth of the peak resident set size (``getrusage``) over the first training step, after
  a warm-up step of a 3-block model on one sample (library and kernel initialisation); it also counts
  memory the allocator keeps after frees, so read it as an order of magnitude next to the tensor figures;
* ``step_seconds``: median time of ``steps`` training steps (forward, backward, Adam step) after the first;
* ``grad_rel_diff_float32``, ``grad_rel_diff_float64``: |g_saving - g_ordinary| / |g_ordinary| (2-norms over
  all parameters) of the first step's gradients, in float32 and, from the same weights and seed, in float64.
  float64 shows the algorithm is exact up to the inverses' tolerance (1e-10); float32 adds their 1e-5
  tolerance and rounding, magnified because bits/dim gradients of a freshly initialised flow are small
  differences of large terms (ActNorm has just standardised every layer's output).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from invertnet.layers import MemorySavingSequential, saved_activation_bytes
from invertnet.models import FlowDistribution, mintnet_flow, multiscale_iresnet_flow

sys.path.insert(0, str(Path(__file__).parent))
from iresnet_block import peak_tensor_mb  # noqa: E402

SHAPE = (1, 28, 28)
LEVELS = 256
MODELS = ("iresnet", "mintnet")
MODES = ("ordinary", "memory_saving")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(model: str, depth: int, memory_saving: bool) -> FlowDistribution:
    if model == "iresnet":
        flow = multiscale_iresnet_flow(
            SHAPE, n_scales=2, n_blocks=max(1, depth // 2), hidden_channels=16, levels=LEVELS
        )
    else:
        flow = mintnet_flow(SHAPE, n_blocks=depth, hidden_factor=8, n_squeezes=2, levels=LEVELS)
    if memory_saving:
        flow.transform = MemorySavingSequential(*flow.transform)
    return flow


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def loss_of(flow: FlowDistribution, x: torch.Tensor) -> torch.Tensor:
    return flow.bits_per_dim(x).mean()


def setup(model: str, depth: int, mode: str, batch: int, dtype: torch.dtype) -> tuple[FlowDistribution, torch.Tensor]:
    """The flow and batch of a configuration, from seed 0 (so both modes start from the same weights and draws)."""
    torch.manual_seed(0)
    flow = build(model, depth, mode == "memory_saving").to(dtype)
    return flow, torch.randint(0, LEVELS, (batch, *SHAPE)).to(dtype)


def gradients(flow: FlowDistribution) -> torch.Tensor:
    return torch.cat([parameter.grad.flatten() for parameter in flow.parameters()]).double()


def worker(model: str, depth: int, mode: str, batch: int, steps: int, gradient_file: Path) -> dict:
    """One configuration in this process: returns its measurements and writes the first step's gradients
    (float32, and float64 from the same weights and seed)."""
    warm, warm_x = setup(model, 3, mode, 1, torch.float32)  # the smallest model with the same shapes
    loss_of(warm, warm_x).backward()
    del warm, warm_x
    flow, x = setup(model, depth, mode, batch, torch.float32)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    before = peak_rss_bytes()
    start = time.perf_counter()
    loss, saved = saved_activation_bytes(lambda: loss_of(flow, x), flow)
    loss.backward()
    first_seconds = time.perf_counter() - start
    rss_growth = peak_rss_bytes() - before
    first_gradients = gradients(flow)
    optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_of(flow, x).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    optimizer.zero_grad(set_to_none=True)
    peak_mb = peak_tensor_mb(lambda x: loss_of(flow, x).backward(), x)
    flow64, x64 = setup(model, depth, mode, batch, torch.float64)
    loss_of(flow64, x64).backward()
    torch.save({"float32": first_gradients, "float64": gradients(flow64)}, gradient_file)
    return {
        "loss": loss.item(),
        "saved_mb": saved / 2**20,
        "peak_tensor_mb": peak_mb,
        "rss_growth_mb": rss_growth / 2**20,
        "first_step_seconds": first_seconds,
        "step_seconds": statistics.median(times),
        "parameters": sum(p.numel() for p in flow.parameters()),
    }


def run_worker(model: str, depth: int, mode: str, args: argparse.Namespace, directory: Path) -> dict:
    gradient_file = directory / f"{model}-{depth}-{mode}.pt"
    command = [sys.executable, __file__, "--worker", model, str(depth), mode, str(gradient_file)]
    command += ["--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return {"model": model, "depth": depth, "mode": mode, **json.loads(completed.stdout)}


def table(rows: list[dict]) -> str:
    lines = [
        "| model | depth | mode | saved for backward (MB) | peak tensors (MB) | peak RSS growth (MB) | s / step "
        "| grad rel. diff float32 | grad rel. diff float64 |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        differences = [row.get(f"grad_rel_diff_{dtype}") for dtype in ("float32", "float64")]
        lines.append(
            f"| {row['model']} | {row['depth']} | {row['mode']} | {row['saved_mb']:.2f} | {row['peak_tensor_mb']:.1f} "
            f"| {row['rss_growth_mb']:.1f} "
            f"| {row['step_seconds']:.3f} | "
            + " | ".join("" if difference is None else f"{difference:.1e}" for difference in differences)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32], help="numbers of blocks")
    parser.add_argument("--batch", type=int, default=16, help="batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "DEPTH", "MODE", "GRADIENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        model, depth, mode, gradient_file = args.worker
        print(json.dumps(worker(model, int(depth), mode, args.batch, args.steps, Path(gradient_file))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for model in MODELS:
            for depth in args.depths:
                log(f"{model}, {depth} blocks ...")
                pair = {mode: run_worker(model, depth, mode, args, Path(directory)) for mode in MODES}
                ordinary, saving = (torch.load(Path(directory) / f"{model}-{depth}-{mode}.pt") for mode in MODES)
                for dtype in ("float32", "float64"):
                    difference = (saving[dtype] - ordinary[dtype]).norm() / ordinary[dtype].norm()
                    pair["memory_saving"][f"grad_rel_diff_{dtype}"] = difference.item()
                rows += pair.values()
    log(table(rows))
    output = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": SHAPE,
        "batch": args.batch,
        "steps": args.steps,
        "results": rows,
    }
    print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
