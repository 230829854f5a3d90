r"""Checkpoints as safetensors + JSON, written atomically and verified on load.

A checkpoint is a directory ``step-NNNNNNNN/`` holding ``tensors.safetensors`` (model, EMA, optimiser tensors
and RNG state) and ``state.json`` (step, config, optimiser/scheduler structure, metrics, the SHA-256 of the
tensor file and, when saved with a key, an HMAC-SHA256 of the manifest). Nothing is ever unpickled.

The write protocol (:func:`save_checkpoint`), and why a process killed between any two operations leaves a
loadable run: (1) partial files of this or of dead processes are removed; (2) the folder ``.step-N.tmp-PID`` is
made, (3) the tensors and (4) ``state.json`` written and flushed to disk in it: a crash up to here leaves only a
partial folder, which ``latest`` never names and the next save removes; (5) a ``step-N`` of an earlier write
that ``latest`` does not name (a run resumed from an older checkpoint) is renamed aside to a partial name (the
checkpoint ``latest`` names is never rewritten); (6) the new folder is renamed
to ``step-N``, one atomic rename of a complete folder; (7) ``latest`` is replaced by a rename (its partial
``.latest.tmp-PID`` is flushed first), the commit point: before it ``latest`` names the previous checkpoint,
after it the new one; (8) the folder renamed aside is removed. If ``latest`` names a checkpoint that is missing
or fails its checks, :func:`load_latest_checkpoint` takes the newest complete earlier one, with a warning.

Threat model. The SHA-256 is unkeyed: it detects corruption (a truncated or partly written file, a flipped bit,
a file of another checkpoint), not tampering: whoever can write the folder can also recompute the checksum.
Against a writer of the run folder, save and load with a ``key``: the manifest, which holds the tensors' SHA-256,
is signed with HMAC-SHA256 (RFC 2104), and a checkpoint signed with a key is refused without it, with another key,
or with its signature removed. What is checked in every case: the step (a non-negative integer, the number in
the folder's name), the tensor references and their strides, and the format version; what the state means (the
EMA has one tensor per parameter) is checked by whoever restores it (:func:`check_weight_average`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from invertnet._files import remove_stale_partials, save_tensors, sync, write_atomically

__all__ = [
    "CheckpointError",
    "CheckpointKeyError",
    "CheckpointWarning",
    "RunWriteError",
    "check_weight_average",
    "check_writable",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "save_checkpoint",
    "writing_to",
]

FORMAT_VERSION = 1
_TENSORS = "tensors.safetensors"
_STATE = "state.json"
_FOLDER = re.compile(r"step-(\d{8})")
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied: the folder is read-only for this user",
    errno.EPERM: "operation not permitted: the folder is read-only for this user",
    errno.EFBIG: "file too large for the file system",
}

Key = bytes | str


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, edited or of an unknown format."""


class CheckpointKeyError(CheckpointError):
    """A checkpoint's HMAC-SHA256 signature and the key given do not agree (no key, another key, or no signature)."""


class CheckpointWarning(UserWarning):
    """The checkpoint ``latest`` names could not be loaded, and an earlier one was taken."""


class RunWriteError(OSError):
    """A file of a run folder could not be written (a full disk, a read-only folder); the message names the file,
    the folder, the reason and the last complete checkpoint, which the failed write left intact."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.errno = code


class _ForeignPointer(CheckpointError):
    """``latest`` names something other than a checkpoint folder of its run."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _signature(manifest: dict[str, Any], key: Key) -> str:
    """HMAC-SHA256 of the manifest without its signature, as canonical JSON (sorted keys, no spaces)."""
    unsigned = {name: value for name, value in manifest.items() if name != "hmac_sha256"}
    message = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()
    secret = key.encode() if isinstance(key, str) else bytes(key)
    if not secret:
        raise ValueError("checkpoint key: empty; give a non-empty key, or None for unsigned checkpoints")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _canonical_strides(shape: Sequence[int]) -> list[int]:
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= max(size, 1)
    return strides[::-1]


def _split_tensors(tree: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference, collecting it in ``tensors``. A tensor whose
    strides are not the canonical ones of its shape (a size-1 dimension with another stride, a channels-last
    layout) records them: kernels choose their path by the strides, and a resumed run computes bit-identically
    only with the layouts the uninterrupted run had."""
    if isinstance(tree, Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous()
        reference: dict[str, Any] = {"__tensor__": prefix}
        if tree.numel() and list(tree.stride()) != _canonical_strides(tree.shape):
            reference["stride"] = list(tree.stride())
        return reference
    if isinstance(tree, dict):
        return {str(key): _split_tensors(value, f"{prefix}.{key}", tensors) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split_tensors(value, f"{prefix}.{index}", tensors) for index, value in enumerate(tree)]
    return tree


def _dense_layout(shape: Sequence[int], stride: Any) -> bool:
    """Whether ``stride`` lays ``shape`` out densely, without overlap (a permutation of the canonical strides)."""
    if not isinstance(stride, list) or len(stride) != len(shape) or not all(type(s) is int and s >= 0 for s in stride):
        return False
    expected = 1
    for step, size in sorted((s, n) for s, n in zip(stride, shape, strict=True) if n != 1):
        if step != expected:
            return False
        expected *= size
    return True


def _restored(reference: dict[str, Any], tensors: dict[str, Tensor]) -> Tensor:
    tensor = tensors[reference["__tensor__"]]
    if "stride" not in reference:
        return tensor
    if not _dense_layout(tensor.shape, reference["stride"]):
        raise CheckpointError(f"tensor {reference['__tensor__']}: strides {reference['stride']} are not a layout")
    return torch.empty_strided(tensor.shape, reference["stride"], dtype=tensor.dtype).copy_(tensor)


def _join_tensors(tree: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree and set(tree) <= {"__tensor__", "stride"}:
            return _restored(tree, tensors)
        return {key: _join_tensors(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_join_tensors(value, tensors) for value in tree]
    return tree


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], key: Key | None = None) -> Path:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) as checkpoint ``step`` of ``run_dir``.

    Returns the checkpoint directory; the run's ``latest`` file names it once it is complete (the protocol and
    its crash points are in the module docstring).

    Arguments:
        run_dir: The run folder (created when missing).
        step: The number of steps done, >= 0: the folder is ``step-NNNNNNNN``.
        state: What to save.
        key: Optional secret (bytes or text) signing the checkpoint with HMAC-SHA256; loading it then needs it.

    Raises:
        CheckpointError: ``step`` is the checkpoint ``latest`` names (replacing it would leave no checkpoint
            behind ``latest`` for a moment); a folder of that step that ``latest`` does not name is replaced.
        RunWriteError: A file could not be written (full disk, read-only folder): the message names it and the
            last complete checkpoint, which is left intact; the partial folder is removed.
    """
    if type(step) is not int or not 0 <= step <= 99_999_999:
        raise ValueError(f"save_checkpoint: step must be an integer in [0, 99999999], got {step!r}")
    run_dir = Path(run_dir)
    with writing_to(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(run_dir)
    final = run_dir / f"step-{step:08d}"
    if final.exists() and _named_by_latest(run_dir, final):
        raise CheckpointError(f"{final} is the run's latest checkpoint: a checkpoint step is written once")
    temporary = run_dir / f".{final.name}.tmp-{os.getpid()}"
    aside = run_dir / f".{final.name}.replaced.tmp-{os.getpid()}"
    try:
        with writing_to(run_dir):
            temporary.mkdir()
            _write_contents(temporary, step, state, key)
            if final.exists():
                os.replace(final, aside)
            os.replace(temporary, final)
            sync(run_dir)
            write_atomically(run_dir / "latest", json.dumps({"checkpoint": final.name, "step": step}, indent=2))
    except RunWriteError:
        shutil.rmtree(temporary, ignore_errors=True)  # free the space the partial write took
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return final


def _named_by_latest(run_dir: Path, folder: Path) -> bool:
    try:
        return latest_checkpoint(run_dir) == folder
    except CheckpointError:
        return False


def _write_contents(folder: Path, step: int, state: dict[str, Any], key: Key | None) -> None:
    """The tensor file and ``state.json`` (with the tensors' SHA-256 and, with a key, the signature), flushed."""
    tensors: dict[str, Tensor] = {}
    structure = _split_tensors(state, "state", tensors)
    sync(save_tensors(tensors, folder / _TENSORS))
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "step": step,
        "state": structure,
        "sha256": {_TENSORS: _sha256(folder / _TENSORS)},
    }
    if key is not None:
        manifest["hmac_sha256"] = _signature(manifest, key)
    (folder / _STATE).write_text(json.dumps(manifest, indent=2))
    sync(folder / _STATE)
    sync(folder)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by the run's ``latest`` file, or ``None`` when the run has none yet.

    Raises:
        CheckpointError: ``latest`` is unreadable or names something other than a ``step-NNNNNNNN`` folder of
            ``run_dir``.
    """
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{pointer}: unreadable pointer to the latest checkpoint ({error})") from error
    if not isinstance(name, str) or _FOLDER.fullmatch(name) is None:
        raise _ForeignPointer(f"{pointer}: names {name!r}, not a checkpoint folder of this run (step-NNNNNNNN)")
    return Path(run_dir) / name


def _manifest(path: Path) -> dict[str, Any]:
    """The checked ``state.json`` of a checkpoint directory whose tensor file matches its SHA-256."""
    state_file, tensor_file = path / _STATE, path / _TENSORS
    for required in (state_file, tensor_file):
        if not required.is_file():
            raise CheckpointError(f"checkpoint {path}: {required.name} is missing")
    try:
        manifest = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {path}: {_STATE} is not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise CheckpointError(f"checkpoint {path}: unknown format {found!r}")
    sha256 = manifest.get("sha256")
    if not isinstance(sha256, dict) or sha256.get(_TENSORS) != _sha256(tensor_file):
        raise CheckpointError(
            f"checkpoint {path}: {_TENSORS} does not match its recorded SHA-256; the file is truncated or was edited"
        )
    return manifest


def _check_signature(path: Path, manifest: dict[str, Any], key: Key | None) -> None:
    recorded = manifest.get("hmac_sha256")
    if recorded is None and key is None:
        return
    if key is None:
        raise CheckpointKeyError(
            f"checkpoint {path} is signed (HMAC-SHA256): load it with the key it was saved with (key=...; the "
            "invertnet command line reads INVERTNET_CHECKPOINT_KEY)"
        )
    if recorded is None:
        raise CheckpointKeyError(
            f"checkpoint {path} has no HMAC-SHA256 signature, but a key was given: it was saved without a key, or "
            "its signature was removed"
        )
    if not isinstance(recorded, str) or not hmac.compare_digest(recorded, _signature(manifest, key)):
        raise CheckpointKeyError(
            f"checkpoint {path}: its HMAC-SHA256 does not match the key: another key, or the checkpoint was altered"
        )


def _check_step(path: Path, step: Any) -> int:
    if type(step) is not int or step < 0:
        raise CheckpointError(f"checkpoint {path}: step {step!r} is not a non-negative integer")
    named = _FOLDER.fullmatch(path.name)
    if named is not None and int(named[1]) != step:
        raise CheckpointError(f"checkpoint {path}: records step {step}, but its folder is named for {int(named[1])}")
    return step


def load_checkpoint(path: str | Path, key: Key | None = None) -> tuple[int, dict[str, Any]]:
    """Read and verify a checkpoint directory; returns ``(step, state)``.

    Arguments:
        path: The checkpoint directory.
        key: The key it was signed with (see :func:`save_checkpoint`), or ``None`` for an unsigned checkpoint.

    Raises:
        CheckpointKeyError: The checkpoint is signed and no key or another key was given, or a key was given and
            the checkpoint is not signed.
        CheckpointError: A file is missing, the JSON is invalid, the tensor file's checksum does not match
            (truncated or edited), the step is not the folder's, a tensor reference is broken, or the format is
            unknown.
    """
    path = Path(path)
    manifest = _manifest(path)
    _check_signature(path, manifest, key)
    step = _check_step(path, manifest.get("step"))
    try:
        state = _join_tensors(manifest["state"], load_file(str(path / _TENSORS)))
    except (SafetensorError, KeyError, OSError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path}: cannot read its tensors ({error!r})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: its state is a {type(state).__name__}, not a dict")
    return step, state


def _checkpoint_folders(run_dir: Path, below: int | None) -> list[Path]:
    """The run's ``step-N`` folders (no links), newest first, only those before step ``below`` when given."""
    folders = [
        path
        for path in run_dir.iterdir()
        if _FOLDER.fullmatch(path.name) and path.is_dir() and not path.is_symlink()
        if below is None or int(path.name[5:]) < below
    ]
    return sorted(folders, key=lambda path: path.name, reverse=True)


def load_latest_checkpoint(run_dir: str | Path, key: Key | None = None) -> tuple[Path, int, dict[str, Any]] | None:
    """The checkpoint ``latest`` names, loaded (``(path, step, state)``), or ``None`` when the run has none.

    When it is missing or fails its checks (or ``latest`` is missing or unreadable while checkpoint folders
    exist), the newest earlier checkpoint that loads is returned instead, with a :class:`CheckpointWarning`
    naming what was skipped and why.

    Raises:
        CheckpointKeyError: A checkpoint's signature and ``key`` disagree (never skipped: not a crash's doing).
        CheckpointError: ``latest`` names a folder of another run, or no checkpoint of the run loads.
    """
    run_dir = Path(run_dir)
    problems: list[str] = []
    try:
        named = latest_checkpoint(run_dir)
    except _ForeignPointer:
        raise
    except CheckpointError as error:
        named, problems = None, [str(error)]
    below = None
    if named is not None:
        try:
            return (named, *load_checkpoint(named, key))
        except CheckpointKeyError:
            raise
        except CheckpointError as error:
            problems.append(str(error))
        below = int(named.name[5:])
    elif not problems and not (run_dir / "latest").exists():
        problems = [f"{run_dir / 'latest'} is missing"]
    for folder in _checkpoint_folders(run_dir, below) if run_dir.is_dir() else []:
        try:
            loaded = (folder, *load_checkpoint(folder, key))
        except CheckpointKeyError:
            raise
        except CheckpointError as error:
            problems.append(str(error))
            continue
        warnings.warn(f"{'; '.join(problems)}: loading {folder.name} instead", CheckpointWarning, stacklevel=2)
        return loaded
    if named is None and len(problems) == 1 and not (run_dir / "latest").exists():
        return None  # a run without checkpoints
    raise CheckpointError(f"{run_dir}: no checkpoint loads ({'; '.join(problems)})")


def check_weight_average(average: Any, parameters: Sequence[Tensor], where: str) -> list[Tensor]:
    """The saved weight average (EMA) as a list of one tensor per parameter, with the parameters' shapes; an
    empty list when none was saved.

    Raises:
        CheckpointError: Naming ``where`` and the mismatch (a shortened or reordered list would otherwise pair
            averages with the wrong parameters, or leave some raw weights among the averaged ones).
    """
    if not isinstance(average, list) or not all(isinstance(value, Tensor) for value in average):
        raise CheckpointError(f"{where}: the weight average (ema) is not a list of tensors")
    if average and len(average) != len(parameters):
        raise CheckpointError(
            f"{where}: the weight average (ema) has {len(average)} tensors for {len(parameters)} trained parameters"
        )
    for index, (value, parameter) in enumerate(zip(average, parameters, strict=False)):
        if value.shape != parameter.shape:
            raise CheckpointError(
                f"{where}: ema tensor {index} has shape {tuple(value.shape)}, its parameter {tuple(parameter.shape)}"
            )
    return average


def _last_intact(run_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint a resume takes (as :func:`load_latest_checkpoint`, by checksums alone) and its step."""
    try:
        named = latest_checkpoint(run_dir)
    except CheckpointError:
        named = None
    below = None if named is None else int(named.name[5:]) + 1
    for folder in _checkpoint_folders(run_dir, below) if run_dir.is_dir() else []:
        try:
            return folder, _check_step(folder, _manifest(folder).get("step"))
        except CheckpointError:
            continue
    return None


def write_failure(run_dir: Path, error: OSError) -> RunWriteError:
    """A :class:`RunWriteError` for ``error``, naming the file, the folder, the reason and the last intact
    checkpoint."""
    reason = _WRITE_ERRORS.get(error.errno or 0, error.strerror or str(error))
    target = error.filename or run_dir
    last = _last_intact(run_dir)
    kept = (
        f"the last complete checkpoint, {last[0].name} (step {last[1]}), is intact; continue from it (invertnet "
        "train --resume) once the folder can be written"
        if last
        else "no checkpoint had been written yet"
    )
    return RunWriteError(f"cannot write {target} in run folder {run_dir}: {reason}; {kept}", error.errno)


@contextlib.contextmanager
def writing_to(run_dir: str | Path) -> Iterator[None]:
    """Context manager turning an ``OSError`` of a failed write (full disk, read-only folder, no permission) into
    a :class:`RunWriteError` naming the file, ``run_dir`` and its last intact checkpoint."""
    try:
        yield
    except RunWriteError:
        raise
    except OSError as error:
        if error.errno not in _WRITE_ERRORS:
            raise
        raise write_failure(Path(run_dir), error) from error


def check_writable(run_dir: str | Path) -> None:
    """Check, before any work, that files can be created in ``run_dir`` (or, while it does not exist, in the
    nearest existing folder above it).

    Raises:
        RunWriteError: Naming the folder and the reason (read-only, no permission).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        existing = next((parent for parent in run_dir.absolute().parents if parent.is_dir()), Path("/"))
        if not os.access(existing, os.W_OK | os.X_OK):
            denied = OSError(errno.EACCES, os.strerror(errno.EACCES), str(existing))
            raise write_failure(run_dir, denied)
        return
    probe = run_dir / f".write-check.tmp-{os.getpid()}"
    with writing_to(run_dir):
        probe.touch()
        probe.unlink()
