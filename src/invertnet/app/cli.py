"""The ``invertnet`` command line: train, evaluate, sample and invert models; list configs; recover latent codes;
the i-ResNet demo."""

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
    """Call ``action(run_dir, *args)``, turning a missing or invalid run folder (or a missing extra) into a CLI
    error."""
    from invertnet.training import RunWriteError

    try:
        return action(run_dir, *args)
    except (FileNotFoundError, ValueError, ImportError, RunWriteError) as error:
        _fail(error)
        raise  # unreachable: _fail raises


@click.group()
@click.version_option(__version__, prog_name="invertnet")
def main() -> None:
    """Build, invert, certify and train invertible neural networks."""


@main.command()
def configs() -> None:
    """List the embedded configs."""
    from invertnet.app.embedded import embedded_configs

    for name in embedded_configs():
        click.echo(name)


@main.command()
@click.option(
    "--config",
    "config_name",
    default=None,
    help="Embedded config name or JSON file [default: digits_dense; with --resume, the run's own config].",
)
@click.option("--set", "overrides", multiple=True, help="Override a setting, e.g. --set train.steps=100.")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None, help="Run folder (default: a new one).")
@click.option("--resume", is_flag=True, help="Continue from the run folder's latest checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def train(
    config_name: str | None, overrides: tuple[str, ...], run_dir: Path | None, resume: bool, quiet: bool, device: str
) -> None:
    """Train the model a config describes (any registered kind), evaluate it and write its run folder; prints the
    summary as JSON.

    A new run needs a new or empty --run-dir. --resume continues the run in --run-dir with the config it recorded
    (a --config that differs from it is refused; --set train.steps=N extends it); a run killed at any moment
    resumes from its last checkpoint. --config RUN/run_config.json starts a new run with another run's config.
    With INVERTNET_CHECKPOINT_KEY set, checkpoints are signed with it (HMAC-SHA256) and load only with it."""
    from invertnet.app.config import DEFAULT_CONFIG, load_config, read_run_config
    from invertnet.app.runs import train_run
    from invertnet.training import RunWriteError, distributed

    if resume and run_dir is None:
        raise click.UsageError("--resume needs --run-dir, the folder of the run to continue")
    try:
        if resume and config_name is None:
            config = read_run_config(run_dir / "run_config.json", list(overrides))  # type: ignore[operator]
        else:
            config = load_config(config_name or DEFAULT_CONFIG, list(overrides))
    except (FileNotFoundError, ValueError) as error:
        _fail(error)
    distributed.setup()
    main_process = distributed.is_main_process()  # decided before teardown, after which every process is rank 0
    try:
        summary = train_run(
            config, run_dir=run_dir, resume=resume, progress=not quiet, device=distributed.resolve_device(device)
        )
    except (FileNotFoundError, ValueError, ImportError, RunWriteError) as error:
        _fail(error)
    finally:
        distributed.teardown()
    if main_process:
        _echo_json(summary)


@main.command()
@click.option("--config", "config_name", required=True, help="Embedded config name or JSON file (spectra models).")
@click.option("--set", "overrides", multiple=True, help="Override a setting, e.g. --set train.steps=100.")
@click.option("--run-dir", type=click.Path(path_type=Path), required=True, help="Folder for the fold runs.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def crossvalidate(config_name: str, overrides: tuple[str, ...], run_dir: Path, quiet: bool) -> None:
    """Train a spectrum classifier on every grouped cross-validation fold (thesis 7.4); prints the balanced
    accuracy per fold, its median and interquartile range, and the fold-averaged sensitivity map's peaks."""
    from invertnet.app.config import load_config
    from invertnet.app.crossvalidate import crossvalidate as run_crossvalidation

    try:
        config = load_config(config_name, list(overrides))
        _echo_json(run_crossvalidation(config, run_dir, progress=not quiet))
    except (FileNotFoundError, ValueError, ImportError) as error:
        _fail(error)


@main.command(name="receptive-field")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("spectra"), show_default=True)
def receptive_field(output_dir: Path) -> None:
    """IsotopeNet's receptive field against Averagine isotope-pattern widths over the mass range (thesis
    Fig. 7.3); saves receptive_field.png."""
    from invertnet.experiments.receptive_field import receptive_field_study

    _echo_json(receptive_field_study(output_dir))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def evaluate(run_dir: Path) -> None:
    """Test metrics (bits/dim, or accuracy for classifiers) and reconstruction error of a trained run."""
    from invertnet.app.runs import evaluate_run

    _echo_json(_on_run(evaluate_run, run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def invert(run_dir: Path) -> None:
    """Reconstruction error of test data through the inverse of a trained run."""
    from invertnet.app.runs import invert_run

    _echo_json(_on_run(invert_run, run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def certify(run_dir: Path) -> None:
    """Certify Lip(g) < 1 for every residual block of a trained run; prints the table, saves certificate.png.

    Exits with status 1 when a residual block is not certified."""
    from invertnet.app.runs import certify_run

    certificate, figure = _on_run(certify_run, run_dir)
    click.echo(certificate.table())
    click.echo(f"figure: {figure}")
    if certificate.blocks and not certificate.certified:
        raise SystemExit(1)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "-n", "count", default=8, show_default=True, type=click.IntRange(min=1), help="Number of metameric samples."
)
def metameric(run_dir: Path, count: int) -> None:
    """Metameric samples of a trained fully invertible classifier (thesis Def. 6.8); writes metameric.png."""
    from invertnet.app.runs import metameric_run

    _echo_json(_on_run(metameric_run, run_dir, count))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "-n", "count", default=64, show_default=True, type=click.IntRange(min=1), help="Number of samples (>= 1)."
)
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Where to save them (.safetensors).")
def sample(run_dir: Path, count: int, output: Path | None) -> None:
    """Draw samples from a trained generative run (flows, GANs) and save them as safetensors, with a PNG beside
    them (an image grid, or a scatter plot of 2-D points)."""
    from invertnet._files import save_tensors
    from invertnet.app.runs import sample_run
    from invertnet.figures import plot_samples

    samples = _on_run(sample_run, run_dir, count)
    output = output or Path(run_dir) / "samples.safetensors"
    save_tensors({"samples": samples}, output)
    click.echo(f"{count} samples of shape {tuple(samples.shape[1:])} written to {output}")
    try:
        figure = plot_samples(samples, output.with_suffix(".png"))
    except ImportError as error:  # the tensors are written; the picture needs the plots extra
        click.echo(f"no picture: {error}", err=True)
    else:
        if figure is not None:
            click.echo(f"a picture of them: {figure}")


@main.command()
@click.argument("generator", type=click.Path(path_type=Path))
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), default=Path("completed.png"), show_default=True)
@click.option(
    "--mask",
    "mask_kind",
    default="uniform",
    show_default=True,
    type=click.Choice(["uniform", "top", "bottom", "left", "right", "border"]),
)
@click.option("--rate", default=0.5, show_default=True, help="Fraction of pixels observed.")
@click.option("--mask-file", type=click.Path(path_type=Path), default=None, help="Own pattern (.png or .safetensors).")
@click.option("--label", type=int, default=None, help="Class label for a conditional generator.")
@click.option("--png-range", default="0,1", show_default=True, help="Generator values of PNG black and white.")
@click.option("--method", default="adam", show_default=True, type=click.Choice(["adam", "gd"]))
@click.option("--restarts", default=4, show_default=True)
@click.option("--max-iter", default=3000, show_default=True)
def recover(
    generator: Path,
    image: Path,
    output: Path,
    mask_kind: str,
    rate: float,
    mask_file: Path | None,
    label: int | None,
    png_range: str,
    method: str,
    restarts: int,
    max_iter: int,
) -> None:
    """Recover a saved GENERATOR's latent code from the observed pixels of IMAGE; write the completed image."""
    from invertnet.app.recover_file import recover_file

    try:
        low, high = (float(value) for value in png_range.split(","))
        record = recover_file(
            generator,
            image,
            output,
            mask_kind=mask_kind,
            rate=rate,
            mask_path=mask_file,
            label=label,
            value_range=(low, high),
            method=method,
            restarts=restarts,
            max_iter=max_iter,
        )
    except (ValueError, ImportError) as error:
        _fail(error)
    _echo_json(record)


@main.command("recover-study")
@click.argument("experiment", type=click.Choice(["landscape", "phase-transition"]))
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("recovery-study"), show_default=True)
@click.option("--rates", default="0.002,0.005,0.01,0.02,0.05,0.1,0.2,0.5", show_default=True)
@click.option("--kinds", default="uniform,top,bottom,left,right,border", show_default=True)
@click.option("--networks", default=10, show_default=True, help="Random generators per setting.")
@click.option("--codes", default=10, show_default=True, help="Random codes per generator.")
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def recover_study(
    experiment: str, output_dir: Path, rates: str, kinds: str, networks: int, codes: int, seed: int, quiet: bool
) -> None:
    """The experiments of Ma, Ayaz & Karaman (2018): loss landscapes (Fig. 4) or the phase transition in the
    sampling rate."""
    from invertnet.experiments.recovery import study_landscapes, study_phase_transition

    try:
        if experiment == "landscape":
            record = study_landscapes(output_dir, seed=seed)
        else:
            rate_values = [float(value) for value in rates.split(",")]
            record = study_phase_transition(
                output_dir, rate_values, kinds.split(","), networks, codes, seed=seed, progress=not quiet
            )
    except (ValueError, ImportError) as error:
        _fail(error)
    _echo_json(record)


@main.command()
@click.argument(
    "experiment",
    type=click.Choice(
        [
            "two-circles",
            "layer-spectra",
            "cifar-spectra",
            "vanilla-vs-iresnet",
            "reconstruction",
            "spheres",
            "independence",
        ]
    ),
)
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("stability"), show_default=True)
@click.option("--seed", default=0, show_default=True)
def stability(experiment: str, output_dir: Path, seed: int) -> None:
    """Invertibility experiments: ReLU preimages and conditioning over the plane (thesis Fig. 3.1), singular
    values of a ReLU CNN's prefix Jacobians (Fig. 3.4; on digits, or medians over 50 inputs for the Table 3.1
    networks WideCIFAR and ThinCIFAR), vanilla ResNets against i-ResNets (Behrmann et al. 2019,
    appendix B: certificates and reconstruction through the inverse), reconstruction error against fixed-point
    iterations for several Lipschitz coefficients (Fig. 4.4), the adversarial spheres (Fig. 6.3), or
    cross-entropy against independence cross-entropy on metameric samples (Fig. 6.5)."""
    from invertnet.experiments import stability as experiments

    if experiment == "independence":
        from invertnet.experiments.independence import independence_study

        record = independence_study(output_dir, seed=seed)
    elif experiment == "reconstruction":
        record = experiments.reconstruction_study(output_dir, seed=seed)
    elif experiment == "spheres":
        record = experiments.spheres_study(output_dir, seed=seed)
    elif experiment == "two-circles":
        record = experiments.two_circles_study(output_dir, seed=seed)
    elif experiment == "layer-spectra":
        record = experiments.cnn_spectra_study(output_dir, seed=seed)
    elif experiment == "cifar-spectra":
        record = experiments.cifar_spectra_study(output_dir, cifar_root="data/cifar-10-batches-py", seed=seed)
    else:
        record = experiments.vanilla_vs_iresnet(seed=seed)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "vanilla_vs_iresnet.json").write_text(json.dumps(record, indent=2))
    _echo_json(record)


@main.command()
@click.option("--seed", default=0, show_default=True, help="Seed of torch's RNG.")
@click.option("--probes", default=200, show_default=True, help="Monte-Carlo probes per log-det estimator.")
def demo(seed: int, probes: int) -> None:
    """Build i-ResNets, certify, invert them and compare log-det estimators; prints JSON."""
    from invertnet.experiments.demo import run_demo

    _echo_json(run_demo(seed=seed, n_probes=probes))


if __name__ == "__main__":
    main()
