"""Trainer callbacks (the metrics records, TensorBoard as one of them, close at the end), the progress bar's
refresh interval, loss.png and sample pictures."""

import io
import json

import pytest
import torch

from invertnet.data import sample_toy
from invertnet.figures import plot_samples
from invertnet.models import dense_iresnet_flow
from invertnet.training import TrainConfig, Trainer
from invertnet.training import loop as training_loop
from invertnet.training.callbacks import TensorBoardLogger
from invertnet.training.curves import plot_metrics


class Recorder:
    def __init__(self):
        self.records, self.closed = [], 0

    def __call__(self, record):
        self.records.append(dict(record))

    def close(self):
        self.closed += 1


def _trainer(run_dir, callbacks=None, **config):
    torch.manual_seed(0)
    flow = dense_iresnet_flow(2, n_blocks=1, hidden_features=8)
    settings = {"steps": 8, "batch_size": 32, "log_every": 2, "eval_every": 4, **config}
    return Trainer(
        flow,
        sample_toy("two_moons", 128),
        TrainConfig(**settings),
        run_dir,
        sample_toy("two_moons", 64),
        progress=False,
        callbacks=callbacks,
    )


def test_callbacks_get_every_metrics_record_and_are_closed(tmp_path):
    recorder = Recorder()
    _trainer(tmp_path, [recorder]).fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recorder.records == lines and recorder.closed == 1
    assert [r["step"] for r in recorder.records if "train_bits_per_dim" in r] == [2, 4, 6, 8]
    assert any("test_bits_per_dim" in r for r in recorder.records)
    assert not (tmp_path / "tensorboard").exists()  # given callbacks replace the default


def test_tensorboard_is_the_default_callback(tmp_path):
    _trainer(tmp_path).fit()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_logger_writes_scalars(tmp_path):
    logger = TensorBoardLogger(tmp_path / "events")
    logger({"step": 3, "loss": 1.5})
    logger.close()
    assert list((tmp_path / "events").glob("events.out.tfevents.*"))


def test_a_callback_that_is_not_callable_is_named(tmp_path):
    with pytest.raises(TypeError, match="callback must be callable"):
        _trainer(tmp_path, ["wandb"])


def test_progress_bar_refreshes_rarely_in_a_log_file(tmp_path, monkeypatch):
    log = io.StringIO()  # not a terminal, like a SLURM log
    monkeypatch.setattr(training_loop.sys, "stderr", log)
    trainer = _trainer(tmp_path, [], steps=200, log_every=1, eval_every=0)
    trainer.progress = True
    trainer.fit()
    updates = log.getvalue().count("\r")
    assert updates <= 4, f"{updates} progress updates for 200 steps"


def test_loss_figure_from_metrics(tmp_path):
    _trainer(tmp_path, []).fit()
    assert plot_metrics(tmp_path).name == "loss.png" and (tmp_path / "loss.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_metrics(tmp_path / "nothing")


def test_sample_pictures(tmp_path):
    assert plot_samples(torch.rand(5, 3, 4, 4), tmp_path / "colour.png").is_file()
    assert plot_samples(torch.randn(100, 2), tmp_path / "points.png").is_file()
    assert plot_samples(torch.randn(4, 7), tmp_path / "nothing.png") is None


def test_a_failing_callback_warns_and_loses_no_checkpoint(tmp_path):
    def broken(record):
        raise ConnectionError("tracker unreachable")

    trainer = _trainer(tmp_path, [broken], checkpoint_every=4)
    with pytest.warns(RuntimeWarning, match="tracker unreachable"):
        trainer.fit()
    assert (tmp_path / "step-00000004").is_dir() and (tmp_path / "step-00000008").is_dir()


def test_a_resumed_run_tells_tensorboard_to_drop_the_steps_it_redoes(tmp_path, monkeypatch):
    import invertnet.training.trainer as trainer_module

    _trainer(tmp_path, checkpoint_every=4).fit(4)
    asked = []

    def recording(run_dir, purge_step=None):
        asked.append(purge_step)
        return []

    monkeypatch.setattr(trainer_module, "default_callbacks", recording)
    resumed = _trainer(tmp_path, checkpoint_every=4)
    assert resumed.resume()
    resumed.fit()
    assert asked == [4]
