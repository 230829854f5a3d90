"""The ``invertnet`` command line: train, evaluate, sample and invert flows; list configs; the i-ResNet demo."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from invertnet import __version__

__all__ = ["main"]

T = TypeVar("T")


def _echo_json(payload: object) -> None:
    click.echo(json.dumps(payload, indent=2))


def _fail(error: Exception) -> None:
    raise click.ClickException(str(error)) from error


def _on_run(action: Callable[..., T], run_dir: Path, *args: object) -> T:
    """Call ``action(run_dir, *args)``, turning a missing or invalid run folder into a CLI error."""
    try:
        return action(run_dir, *args)
    except (FileNotFoundError, ValueError) as error:
        _fail(error)
        raise  # unreachable: _fail raises


@click.group()
@click.version_option(__version__, prog_name="invertnet")
def main() -> None:
    """Build, invert, certify and train invertible neural networks."""


@main.command()
def configs() -> None:
    """List the embedded configs."""
    from invertnet.config import embedded_configs

    for name in embedded_configs():
        click.echo(name)


@main.command()
@click.option("--config", "config_name", default="digits", show_default=True, help="Embedded config name or JSON file.")
@click.option("--set", "overrides", multiple=True, help="Override a setting, e.g. --set train.steps=100.")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None, help="Run folder (default: a new one).")
@click.option("--resume", is_flag=True, help="Continue from the run folder's latest checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def train(
    config_name: str, overrides: tuple[str, ...], run_dir: Path | None, resume: bool, quiet: bool, device: str
) -> None:
    """Train a flow or an invertible classifier, evaluate it and write its run folder; prints the summary as JSON."""
    from invertnet.config import load_config
    from invertnet.run import train_run
    from invertnet.training import distributed

    try:
        config = load_config(config_name, list(overrides))
    except ValueError as error:
        _fail(error)
    if resume and run_dir is None:
        raise click.UsageError("--resume needs --run-dir, the folder of the run to continue")
    distributed.setup()
    main_process = distributed.is_main_process()  # decided before teardown, after which every process is rank 0
    try:
        summary = train_run(
            config, run_dir=run_dir, resume=resume, progress=not quiet, device=distributed.resolve_device(device)
        )
    except ValueError as error:
        _fail(error)
    finally:
        distributed.teardown()
    if main_process:
        _echo_json(summary)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def evaluate(run_dir: Path) -> None:
    """Test metrics (bits/dim, or accuracy for classifiers) and reconstruction error of a trained run."""
    from invertnet.run import evaluate_run

    _echo_json(_on_run(evaluate_run, run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def invert(run_dir: Path) -> None:
    """Reconstruction error of test data through the inverse of a trained run."""
    from invertnet.run import invert_run

    _echo_json(_on_run(invert_run, run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-n", "count", default=64, show_default=True, help="Number of samples.")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Where to save them (.safetensors).")
def sample(run_dir: Path, count: int, output: Path | None) -> None:
    """Draw samples from a trained flow run and save them as safetensors."""
    from safetensors.torch import save_file

    from invertnet.run import sample_run

    samples = _on_run(sample_run, run_dir, count)
    output = output or Path(run_dir) / "samples.safetensors"
    save_file({"samples": samples.contiguous()}, str(output))
    click.echo(f"{count} samples of shape {tuple(samples.shape[1:])} written to {output}")


@main.command()
@click.option("--seed", default=0, show_default=True, help="Seed of torch's RNG.")
@click.option("--probes", default=200, show_default=True, help="Monte-Carlo probes per log-det estimator.")
def demo(seed: int, probes: int) -> None:
    """Build i-ResNets, certify, invert them and compare log-det estimators; prints JSON."""
    from invertnet.demo import run_demo

    _echo_json(run_demo(seed=seed, n_probes=probes))


if __name__ == "__main__":
    main()
