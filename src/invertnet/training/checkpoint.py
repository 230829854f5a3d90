r"""Checkpoints as safetensors + JSON, written atomically and verified on load.

A checkpoint is a directory ``step-NNNNNNNN/`` holding ``tensors.safetensors`` (model, EMA, optimiser tensors
and RNG state) and ``state.json`` (step, config, optimiser/scheduler structure, metrics, and the SHA-256 of the
tensor file). It is written to a temporary directory and renamed into place, and the run's ``latest`` file is
replaced atomically after it, so a crash never leaves a half-written checkpoint behind the ``latest`` pointer.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from invertnet._files import process_exists, save_tensors, write_atomically

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1
_TENSORS = "tensors.safetensors"
_STATE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, edited or of an unknown format."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _split_tensors(tree: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference, collecting it in ``tensors``."""
    if isinstance(tree, Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {str(key): _split_tensors(value, f"{prefix}.{key}", tensors) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split_tensors(value, f"{prefix}.{index}", tensors) for index, value in enumerate(tree)]
    return tree


def _join_tensors(tree: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {key: _join_tensors(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_join_tensors(value, tensors) for value in tree]
    return tree


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) as checkpoint ``step`` of ``run_dir``.

    Returns the checkpoint directory. The ``latest`` file of the run names it once it is complete.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:08d}"
    temporary = run_dir / f".step-{step:08d}.tmp-{os.getpid()}"
    _remove_partial_checkpoints(run_dir)
    temporary.mkdir()
    tensors: dict[str, Tensor] = {}
    structure = _split_tensors(state, "state", tensors)
    save_tensors(tensors, temporary / _TENSORS)
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "state": structure,
        "sha256": {_TENSORS: _sha256(temporary / _TENSORS)},
    }
    (temporary / _STATE).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    write_atomically(run_dir / "latest", json.dumps({"checkpoint": final.name, "step": step}, indent=2))
    return final


def _remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete the ``.step-N.tmp-PID`` folders of interrupted writes: this process's, and those of processes that
    no longer exist (one process trains a run folder at a time)."""
    for partial in run_dir.glob(".step-*.tmp-*"):
        pid = partial.name.rpartition("-")[2]
        if pid.isdigit() and (int(pid) == os.getpid() or not process_exists(int(pid))):
            shutil.rmtree(partial, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by the run's ``latest`` file, or ``None`` when the run has none yet."""
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{pointer}: unreadable pointer to the latest checkpoint ({error})") from error
    if not isinstance(name, str) or re.fullmatch(r"step-\d{8}", name) is None:
        raise CheckpointError(f"{pointer}: names {name!r}, not a checkpoint folder of this run (step-NNNNNNNN)")
    return Path(run_dir) / name


def load_checkpoint(path: str | Path) -> tuple[int, dict[str, Any]]:
    """Read and verify a checkpoint directory; returns ``(step, state)``.

    Raises:
        CheckpointError: If a file is missing, the JSON is invalid, the tensor file's checksum does not match
            (truncated or edited), or the format is unknown.
    """
    path = Path(path)
    state_file, tensor_file = path / _STATE, path / _TENSORS
    for required in (state_file, tensor_file):
        if not required.is_file():
            raise CheckpointError(f"checkpoint {path}: {required.name} is missing")
    try:
        manifest = json.loads(state_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path}: {_STATE} is not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: unknown format {manifest.get('format') if isinstance(manifest, dict) else manifest!r}"
        )
    expected = manifest.get("sha256", {}).get(_TENSORS)
    if expected != _sha256(tensor_file):
        raise CheckpointError(
            f"checkpoint {path}: {_TENSORS} does not match its recorded SHA-256; the file is truncated or was edited"
        )
    try:
        tensors = load_file(str(tensor_file))
        state = _join_tensors(manifest["state"], tensors)
    except (SafetensorError, KeyError, OSError) as error:
        raise CheckpointError(f"checkpoint {path}: cannot read its tensors ({error})") from error
    return int(manifest["step"]), state
