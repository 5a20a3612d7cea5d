"""One server per state folder: an exclusive lock on EMBER_HOME, held for the server's lifetime.

Two servers on one folder would share one database and one file store, and the second one's
restart recovery would mark the first one's live predictions as interrupted. `ember serve` takes
this lock before anything touches the folder; a second server fails at once, naming the process
that holds it. The lock is an OS lock (flock) on `<home>/ember.lock`: it ends with the process,
however the process ends, so there is never a stale lock to clean up.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "ember.lock"


class StateFolderBusy(RuntimeError):
    def __init__(self, home: Path, holder: str):
        super().__init__(f"Another ember server (pid {holder or 'unknown'}) is using the state folder {home}. "
                         "Stop it, or give this server its own EMBER_HOME.")
        self.home = home
        self.holder = holder


@dataclass
class StateLock:
    path: Path
    fd: int

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def lock_state_folder(home: Path) -> StateLock:
    """Take the folder's lock (StateFolderBusy if another process has it) and record our pid."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StateFolderBusy(home, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return StateLock(path, fd)
