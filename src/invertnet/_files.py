r"""Files a run writes: safetensors files with the permissions of any other new file, and whether the process
that left a partial or lock file still lives."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

__all__ = ["process_exists", "save_tensors", "write_atomically"]


def save_tensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` (contiguous CPU copies of ``tensors``), then the file's mode set from the
    umask as for any new file: safetensors creates its files 0600 whatever the umask. Returns the path."""
    path = Path(path)
    save_file({name: value.detach().contiguous().cpu() for name, value in tensors.items()}, str(path), metadata)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
    return path


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` by a rename, so that a crash leaves the old file or the new, never half of it."""
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
