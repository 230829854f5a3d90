"""Runs killed with SIGKILL at random moments and resumed end bit-identical to an uninterrupted run.

Each case starts ``invertnet train`` as a subprocess, kills it (``kill -9``) after a seeded random delay once it
trains, resumes it with ``--resume`` and kills it again (two or three kills in all), resumes it to the end, and
compares every tensor and value of the final checkpoint (model, EMA, optimiser state, schedule, RNG) with those
of the same config trained without interruption: a dense flow with the exact log-det and a cosine schedule, the
multiscale convolutional flow on digits (power series, Adamax, cosine) and the conditional DCGAN on digits (Adam,
constant schedule, both players in one module).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from invertnet._files import is_stale_partial
from invertnet.training import load_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")]

CASES = {
    "dense_cosine": [
        "--config", "two_moons", "--set", "data.n_train=512", "--set", "data.n_test=64", "--set", "model.n_blocks=1",
        "--set", "model.hidden_features=8", "--set", "train.steps=60", "--set", "train.batch_size=32",
        "--set", "train.checkpoint_every=7", "--set", "train.log_every=1",
    ],
    "multiscale_digits": [
        "--config", "digits", "--set", "model.n_blocks=1", "--set", "model.hidden_channels=4",
        "--set", "model.n_terms=2", "--set", "train.steps=24", "--set", "train.batch_size=16",
        "--set", "train.checkpoint_every=5", "--set", "train.log_every=1",
    ],
    "dcgan_digits": [
        "--config", "dcgan_digits", "--set", "model.width=8", "--set", "train.steps=40",
        "--set", "train.batch_size=16", "--set", "train.checkpoint_every=6", "--set", "train.log_every=1",
        "--set", "train.schedule=constant",
    ],
}  # fmt: skip
KILLS = {"dense_cosine": 3, "multiscale_digits": 2, "dcgan_digits": 2}


def _command(case: str, run_dir: Path, resume: bool) -> list[str]:
    resumed = ["--resume"] if resume else CASES[case]
    return [sys.executable, "-m", "invertnet.app.cli", "train", "--quiet", "--device", "cpu", *resumed,
            "--run-dir", str(run_dir)]  # fmt: skip


def _start(case: str, run_dir: Path, resume: bool) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run_dir.parent.joinpath(f"{run_dir.name}.log").touch()
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        return subprocess.Popen(_command(case, run_dir, resume), env=environment, stdout=subprocess.DEVNULL, stderr=log)


def _logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _final_step(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "latest").read_text())["step"]
    except (OSError, ValueError):
        return None


def _until_final_checkpoint(process: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 120) -> None:
    """Wait until ``latest`` names the last step (written after the complete checkpoint), then stop the process:
    what follows (the summary's evaluation and figures) does not touch the checkpoint."""
    deadline = time.monotonic() + timeout
    while _final_step(run_dir) != steps:
        if process.poll() is not None and _final_step(run_dir) != steps:
            log = run_dir.parent / f"{run_dir.name}.log"
            raise AssertionError(f"training stopped early ({process.returncode}): {log.read_text()[-2000:]}")
        assert time.monotonic() < deadline, "training did not finish in time"
        time.sleep(0.02)
    process.kill()
    process.wait()


def _kill_while_training(process: subprocess.Popen, run_dir: Path, delay: float) -> None:
    """SIGKILL ``process`` ``delay`` seconds after it logged a new step (or when it ends by itself)."""
    before = _logged_steps(run_dir)
    while _logged_steps(run_dir) <= before and process.poll() is None:
        time.sleep(0.01)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _interrupted(case: str, run_dir: Path, steps: int, kills: int, seed: int) -> None:
    delays = random.Random(seed)
    _kill_while_training(_start(case, run_dir, resume=False), run_dir, delays.uniform(0, 0.8))
    for _ in range(kills - 1):
        _kill_while_training(_start(case, run_dir, resume=True), run_dir, delays.uniform(0, 0.8))
    _until_final_checkpoint(_start(case, run_dir, resume=True), run_dir, steps)


def _uninterrupted(case: str, run_dir: Path, monkeypatch) -> None:
    """The same config trained without interruption, in this process through the same ``train_run`` (its
    summary, which does not touch the checkpoints, left out)."""
    from invertnet.app import runs
    from invertnet.app.config import load_config

    arguments = CASES[case]
    overrides = [value for option, value in zip(arguments, arguments[1:], strict=False) if option == "--set"]
    monkeypatch.setattr(runs, "_finish", lambda *args: {})
    runs.train_run(load_config(arguments[arguments.index("--config") + 1], overrides), run_dir, progress=False)


def _assert_identical(actual, expected, where: str = "state") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            _assert_identical(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_identical(a, e, f"{where}.{index}")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_killed_and_resumed_ends_bit_identical_to_an_uninterrupted_one(case, tmp_path, monkeypatch):
    steps = int(next(arg for arg in CASES[case] if arg.startswith("train.steps=")).split("=")[1])
    with ThreadPoolExecutor(1) as pool:  # the reference trains while the other run is killed
        interrupted = pool.submit(_interrupted, case, tmp_path / "killed", steps, KILLS[case], sum(map(ord, case)))
        _uninterrupted(case, tmp_path / "uninterrupted", monkeypatch)
        interrupted.result()
    name = f"step-{steps:08d}"
    expected_step, expected = load_checkpoint(tmp_path / "uninterrupted" / name)
    actual_step, actual = load_checkpoint(tmp_path / "killed" / name)
    assert actual_step == expected_step == steps
    _assert_identical(actual, expected)
    logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # steps redone after a kill are logged once
    # The last process is killed once its final checkpoint is complete, possibly while it writes weights.json,
    # the summary or a figure: such a partial file is stale (its process is gone), and the next start of the run
    # removes it (test_cli's resume test). No partial checkpoint may be left (an old copy of a re-written step set
    # aside, ".step-N.replaced.tmp-PID", is not one: the pointer already names the complete new copy).
    leftovers = list((tmp_path / "killed").glob(".*.tmp-*"))
    assert all(is_stale_partial(path) for path in leftovers), leftovers
    partial_checkpoints = [
        path for path in leftovers if path.name.startswith((".step-", ".latest")) and ".replaced." not in path.name
    ]
    assert not partial_checkpoints, partial_checkpoints
