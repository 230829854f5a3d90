"""The ``invertnet`` command line."""

from __future__ import annotations

import json

import click

from invertnet import __version__

__all__ = ["main"]


@click.group()
@click.version_option(__version__, prog_name="invertnet")
def main() -> None:
    """Build, invert, certify and train invertible neural networks."""


@main.command()
@click.option("--seed", default=0, show_default=True, help="Seed of torch's RNG.")
@click.option("--probes", default=200, show_default=True, help="Monte-Carlo probes per log-det estimator.")
def demo(seed: int, probes: int) -> None:
    """Build i-ResNets, certify, invert them and compare log-det estimators; prints JSON."""
    from invertnet.demo import run_demo

    click.echo(json.dumps(run_demo(seed=seed, n_probes=probes), indent=2))
