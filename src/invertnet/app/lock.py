r"""One training process per run folder: the lock file ``RUN_DIR/.lock`` holds the owner's process id and host.

A second process on the same folder is refused while the owner lives; the lock of a process that died (``kill
-9``, a crash) is taken over, with a message on standard error.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from types import TracebackType

from invertnet._files import process_exists

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "check_unlocked"]

LOCK_NAME = ".lock"


class RunLockedError(ValueError):
    """Another living process trains in this run folder."""


def _owner(lock: Path) -> tuple[int, str] | None:
    """(pid, host) recorded in a lock file, or ``None`` if it cannot be read (being written, or garbage)."""
    try:
        pid, host = lock.read_text().split(maxsplit=1)
        return int(pid), host.strip()
    except (OSError, ValueError):
        return None


def _alive(pid: int, host: str) -> bool:
    """Whether the process ``pid`` of ``host`` lives; a lock of another host is taken to be alive."""
    return host != socket.gethostname() or process_exists(pid)


def check_unlocked(run_dir: Path) -> None:
    """Raise :class:`RunLockedError` when a living process holds ``run_dir``'s lock."""
    owner = _owner(run_dir / LOCK_NAME)
    if owner is not None and owner[0] != os.getpid() and _alive(*owner):
        raise RunLockedError(
            f"{run_dir} is being trained by process {owner[0]} on {owner[1]} (lock file {LOCK_NAME}); wait for it "
            "to finish or stop it, then --resume"
        )


class RunLock:
    """Context manager holding ``run_dir``'s lock for this process; released (the file removed) on exit.

    Raises:
        RunLockedError: On entry, when a living process holds the lock.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME

    def __enter__(self) -> RunLock:
        record = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                check_unlocked(self.path.parent)
                owner = _owner(self.path)
                print(
                    f"invertnet: taking over the lock of process {owner[0] if owner else '?'}, which is gone: "
                    f"{self.path}",
                    file=sys.stderr,
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w") as lock:
                lock.write(record)
            return self
        raise RunLockedError(f"{self.path}: could not take the lock (another process took it at the same time)")

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if _owner(self.path) == (os.getpid(), socket.gethostname()):
            self.path.unlink(missing_ok=True)
