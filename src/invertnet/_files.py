r"""Files a run writes: safetensors files with the permissions of any other new file, whole-file replacement by a
rename, whether the process that left a partial or lock file still lives, and the removal of partial files of
interrupted writes."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "is_stale_partial",
    "process_exists",
    "remove_stale_partials",
    "save_tensors",
    "sync",
    "write_atomically",
    "write_atomically_with",
]

_PARTIAL = re.compile(r"\..+\.tmp-(\d+)")
"""Names of partial files and folders, ``.NAME.tmp-PID``: written by process PID, renamed to NAME when complete."""


def save_tensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` (contiguous CPU copies of ``tensors``), then the file's mode set from the
    umask as for any new file: safetensors creates its files 0600 whatever the umask. Returns the path.

    Raises:
        OSError: The file could not be written, with the operating system's error number (safetensors reports
            it as a ``SafetensorError`` with the number in its message).
    """
    path = Path(path)
    try:
        save_file({name: value.detach().contiguous().cpu() for name, value in tensors.items()}, str(path), metadata)
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from error
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
    return path


def sync(path: Path) -> None:
    """Flush a file's or a folder's (its entries') data to the disk: a rename after it survives a power cut with
    the complete contents, not an empty file."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` by a rename, so that a crash leaves the old file or the new, never half of it."""
    write_atomically_with(path, lambda partial: partial.write_text(text))


def write_atomically_with(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(partial)`` to write a partial file beside ``path``, then rename it to ``path``: a crash or a
    full disk leaves the old file or the new, never half of it (a failed write removes the partial file)."""
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(partial)
        sync(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    sync(path.parent)
    return path


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_partial(path: Path) -> bool:
    """Whether ``path`` is a partial file or folder (``.NAME.tmp-PID``) of this process or of one that is gone: an
    interrupted write, which nothing will complete."""
    match = _PARTIAL.fullmatch(path.name)
    return match is not None and (int(match[1]) == os.getpid() or not process_exists(int(match[1])))


def remove_stale_partials(folder: Path) -> None:
    """Delete the stale partial files and folders (see :func:`is_stale_partial`) directly in ``folder``."""
    for path in folder.iterdir():
        if not is_stale_partial(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
