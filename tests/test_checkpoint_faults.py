"""Checkpoints under faults: death at every file operation of a save, damaged ``latest`` targets, full disks and
read-only folders, signed checkpoints (HMAC-SHA256), tampered metadata, tensor layouts."""

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import invertnet._files
from invertnet.data import sample_toy
from invertnet.logdet import PowerSeriesLogDet
from invertnet.models import dense_iresnet_flow
from invertnet.training import (
    CheckpointError,
    CheckpointKeyError,
    CheckpointWarning,
    RunWriteError,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)


def _trainer(run_dir, **config):
    torch.manual_seed(5)
    flow = dense_iresnet_flow(2, n_blocks=1, hidden_features=8, log_det=PowerSeriesLogDet(2))
    settings = dict(steps=6, batch_size=32, lr=3e-3, ema_decay=0.9, schedule="cosine", checkpoint_every=2, seed=3)
    settings.update(config)
    return Trainer(flow, sample_toy("two_moons", 128), TrainConfig(**settings), run_dir, progress=False)


def _tensors(trainer):
    return [*trainer.model.state_dict().values(), *trainer.state.ema]


class _Killed(BaseException):
    """The process died here (not an Exception: nothing may catch it on the way up)."""


class _Death:
    """Counts the file operations of a save and dies at the ``at``-th (1-based): before a rename, a folder
    creation, a removal or a flush, and halfway through writing a file (a torn write)."""

    def __init__(self, at: int | None) -> None:
        self.at, self.count = at, 0

    def _tick(self) -> bool:
        self.count += 1
        return self.count == self.at

    def plain(self, function):
        def operation(*args, **kwargs):
            if self._tick():
                raise _Killed
            return function(*args, **kwargs)

        return operation

    def write_text(self, original):
        def operation(path, text, *args, **kwargs):
            if self._tick():
                original(path, text[: len(text) // 2])
                raise _Killed
            return original(path, text, *args, **kwargs)

        return operation

    def save_file(self, original):
        def operation(tensors, filename, metadata=None):
            original(tensors, filename, metadata)
            if self._tick():
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                raise _Killed

        return operation


@contextlib.contextmanager
def _dying(monkeypatch, at):
    death = _Death(at)
    with monkeypatch.context() as patch:
        for module, name in [(os, "mkdir"), (os, "replace"), (os, "fsync"), (os, "unlink"), (os, "chmod")]:
            patch.setattr(module, name, death.plain(getattr(module, name)))
        patch.setattr(shutil, "rmtree", death.plain(shutil.rmtree))
        patch.setattr(Path, "write_text", death.write_text(Path.write_text))
        patch.setattr(invertnet._files, "save_file", death.save_file(invertnet._files.save_file))
        yield death


@pytest.mark.parametrize("replacing", [False, True], ids=["new-step", "step-folder-exists"])
def test_a_save_killed_at_any_file_operation_leaves_a_run_that_loads_and_resumes_exactly(
    tmp_path, monkeypatch, replacing
):
    reference = _trainer(tmp_path / "reference")
    reference.fit()
    ahead = _trainer(tmp_path / "ahead")
    ahead.fit(until=4)
    state = ahead.checkpoint_state()  # what the save at step 4 writes (torch's RNG is one per process)
    base = tmp_path / "base"
    _trainer(base).fit(until=2)
    if replacing:  # a complete step-4 of an earlier write (killed before latest named it)
        shutil.copytree(tmp_path / "ahead" / "step-00000004", base / "step-00000004")
    with _dying(monkeypatch, None) as dry_run:
        save_checkpoint(tmp_path / "dry", 4, state)
    n_operations = dry_run.count
    assert n_operations >= 10
    for at in range(1, n_operations + 1):
        run_dir = tmp_path / f"killed-{at}"
        shutil.copytree(base, run_dir)
        with _dying(monkeypatch, at), pytest.raises(_Killed):
            save_checkpoint(run_dir, 4, state)
        named = latest_checkpoint(run_dir)
        assert named.name in ("step-00000002", "step-00000004"), at
        path, step, _ = load_latest_checkpoint(run_dir)  # no warning: latest names a complete checkpoint
        assert path == named and step in (2, 4)
        resumed = _trainer(run_dir)
        assert resumed.resume() and resumed.step == step
        resumed.fit()
        for actual, expected in zip(_tensors(resumed), _tensors(reference), strict=True):
            assert torch.equal(actual, expected), f"killed at operation {at}"
        assert not list(run_dir.glob(".*.tmp-*")), f"killed at operation {at}: leftovers"
        assert sorted(p.name for p in run_dir.glob("step-*")) == [f"step-{s:08d}" for s in (2, 4, 6)]


def test_latest_naming_a_missing_or_damaged_checkpoint_falls_back_to_an_earlier_one(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit()  # checkpoints at 2, 4, 6
    tensors = tmp_path / "step-00000006" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-7])
    with pytest.warns(CheckpointWarning, match=r"step-00000006.*truncated or was edited.*loading step-00000004"):
        path, step, _ = load_latest_checkpoint(tmp_path)
    assert (path.name, step) == ("step-00000004", 4)
    shutil.rmtree(tmp_path / "step-00000006")
    shutil.rmtree(tmp_path / "step-00000004" / "state.json", ignore_errors=True)
    (tmp_path / "step-00000004" / "state.json").unlink()
    with pytest.warns(CheckpointWarning, match="loading step-00000002"):
        resumed = _trainer(tmp_path)
        assert resumed.resume() and resumed.step == 2
    (tmp_path / "latest").unlink()  # killed after its first checkpoint folder, before the pointer
    with pytest.warns(CheckpointWarning, match="latest is missing.*loading step-00000002"):
        assert load_latest_checkpoint(tmp_path)[1] == 2
    shutil.rmtree(tmp_path / "step-00000002")
    with pytest.raises(CheckpointError, match="no checkpoint loads"):
        load_latest_checkpoint(tmp_path)
    assert load_latest_checkpoint(tmp_path / "new") is None


def test_a_full_disk_names_the_file_and_the_intact_last_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    trainer.fit(until=2)
    original = invertnet._files.save_file

    def full(tensors, filename, metadata=None):
        message = f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"'
        raise SafetensorError(message)

    monkeypatch.setattr(invertnet._files, "save_file", full)
    with pytest.raises(RunWriteError) as raised:
        trainer.fit(until=4)
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert "tensors.safetensors" in message and str(tmp_path) in message and "no space left on device" in message
    assert "step-00000002 (step 2), is intact" in message
    monkeypatch.setattr(invertnet._files, "save_file", original)
    assert not list(tmp_path.glob(".*.tmp-*"))  # the partial checkpoint is removed, freeing its space
    assert load_latest_checkpoint(tmp_path)[1] == 2


def _read_only_probe(monkeypatch):
    """A read-only file system under the run folder: creating a file fails with EROFS (root ignores modes)."""
    touch = Path.touch

    def refused(path, *args, **kwargs):
        if path.name.startswith(".write-check"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return touch(path, *args, **kwargs)

    monkeypatch.setattr(Path, "touch", refused)


def test_a_read_only_run_folder_is_refused_before_training(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    trainer.fit(until=2)
    _read_only_probe(monkeypatch)
    resumed = _trainer(tmp_path)
    resumed.resume()
    with pytest.raises(RunWriteError, match=r"read-only file system; the last complete checkpoint, step-00000002"):
        resumed.fit()
    assert resumed.step == 2  # nothing was trained


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_without_write_permission_is_refused_before_training(tmp_path):
    trainer = _trainer(tmp_path / "run")
    trainer.fit(until=2)
    (tmp_path / "run").chmod(0o555)
    try:
        resumed = _trainer(tmp_path / "run")
        resumed.resume()
        with pytest.raises(RunWriteError, match="permission denied: the folder is read-only"):
            resumed.fit()
        assert resumed.step == 2
    finally:
        (tmp_path / "run").chmod(0o755)


def _resign(checkpoint: Path, edit) -> None:
    """Edit ``state.json`` as an attacker would: the unkeyed SHA-256 of the tensors stays valid."""
    manifest = json.loads((checkpoint / "state.json").read_text())
    edit(manifest)
    (checkpoint / "state.json").write_text(json.dumps(manifest))


def test_signed_checkpoints_load_only_with_their_key(tmp_path):
    state = {"x": torch.arange(3.0)}
    path = save_checkpoint(tmp_path, 1, state, key="secret")
    assert torch.equal(load_checkpoint(path, key=b"secret")[1]["x"], state["x"])
    with pytest.raises(CheckpointKeyError, match="is signed .*HMAC-SHA256.*the key it was saved with"):
        load_checkpoint(path)
    with pytest.raises(CheckpointKeyError, match="does not match the key"):
        load_checkpoint(path, key="guess")
    _resign(path, lambda manifest: manifest.update(step=1, state={"x": {"__tensor__": "state.x"}, "y": 1}))
    with pytest.raises(CheckpointKeyError, match="does not match the key"):
        load_checkpoint(path, key="secret")  # any edit of the manifest breaks the signature
    _resign(path, lambda manifest: manifest.pop("hmac_sha256"))
    with pytest.raises(CheckpointKeyError, match="no HMAC-SHA256 signature, but a key was given"):
        load_checkpoint(path, key="secret")
    unsigned = save_checkpoint(tmp_path / "plain", 1, state)
    with pytest.raises(CheckpointKeyError, match="no HMAC-SHA256 signature"):
        load_checkpoint(unsigned, key="secret")
    with pytest.raises(ValueError, match="empty"):
        save_checkpoint(tmp_path / "empty", 1, state, key="")


def test_a_signed_run_does_not_fall_back_to_an_unsigned_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.zeros(1)})
    save_checkpoint(tmp_path, 2, {"x": torch.ones(1)}, key="k")
    with pytest.raises(CheckpointKeyError):
        load_latest_checkpoint(tmp_path)
    assert load_latest_checkpoint(tmp_path, key="k")[1] == 2


def test_tampered_steps_and_weight_averages_are_refused_by_name(tmp_path):
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit()
    path = latest_checkpoint(tmp_path)
    _resign(path, lambda manifest: manifest.update(step=-5))
    with pytest.raises(CheckpointError, match="step -5 is not a non-negative integer"):
        load_checkpoint(path)
    _resign(path, lambda manifest: manifest.update(step=3))
    with pytest.raises(CheckpointError, match="records step 3, but its folder is named for 2"):
        load_checkpoint(path)
    _resign(path, lambda manifest: manifest.update(step=2))
    _resign(path, lambda manifest: manifest["state"]["ema"].pop())
    with pytest.raises(CheckpointError, match=r"weight average \(ema\) has \d+ tensors for \d+ trained parameters"):
        _trainer(tmp_path, steps=2).resume()


def test_tensor_layouts_are_restored_so_that_kernels_compute_as_before(tmp_path):
    size_one = torch.randn(1, 3, 4, 1).transpose(1, 3)  # contiguous, but strides of size-1 dimensions differ
    channels_last = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    step, state = load_checkpoint(save_checkpoint(tmp_path, 0, {"a": size_one, "b": channels_last, "c": torch.ones(2)}))
    for name, original in (("a", size_one), ("b", channels_last)):
        assert torch.equal(state[name], original) and state[name].stride() == original.stride(), name
    _resign(latest_checkpoint(tmp_path), lambda manifest: manifest["state"]["b"].update(stride=[0, 0, 0, 0]))
    with pytest.raises(CheckpointError, match=r"strides \[0, 0, 0, 0\] are not a layout"):
        load_checkpoint(latest_checkpoint(tmp_path))


def test_the_checksum_is_an_unkeyed_sha256_of_the_tensor_file(tmp_path):
    """What the docs promise: corruption is detected by a plain SHA-256 anyone can recompute (no tamper-proofing)."""
    path = save_checkpoint(tmp_path, 0, {"x": torch.ones(2)})
    recorded = json.loads((path / "state.json").read_text())["sha256"]["tensors.safetensors"]
    assert recorded == hashlib.sha256((path / "tensors.safetensors").read_bytes()).hexdigest()


def test_a_full_disk_at_the_pointer_names_the_checkpoint_a_resume_takes(tmp_path, monkeypatch):
    import invertnet.training.checkpoint as checkpoint

    trainer = _trainer(tmp_path)
    trainer.fit(until=2)

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path.with_name(f".{path.name}.tmp-1")))

    monkeypatch.setattr(checkpoint, "write_atomically", full)
    with pytest.raises(RunWriteError, match=r"\.latest\.tmp-1 .*step-00000002 \(step 2\), is intact"):
        trainer.fit(until=4)
    monkeypatch.undo()
    assert (tmp_path / "step-00000004").is_dir() and load_latest_checkpoint(tmp_path)[1] == 2  # no warning
    resumed = _trainer(tmp_path)
    assert resumed.resume() and resumed.step == 2
    resumed.fit()  # rewrites the step-4 folder latest never named
    assert load_latest_checkpoint(tmp_path)[1] == 6
