"""One process owns a run directory at a time: an exclusive ``flock`` on ``<run>/run.lock``.

The kernel drops the lock when its holder ends, however it ends (kill -9 included), so a lock left by a dead process
never blocks the next run. The file itself stays; while it is locked it names its holder (pid, host, start time,
command), which is what a second process reports before it exits, having touched nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from harness.errors import HarnessError

LOCK_NAME = "run.lock"
HOLDER_WRITE_WAIT_S = 5.0  # how long a second process waits for the lock's holder to name itself
TRAINING_RUN_ADVICE = "wait for that run to end, or stop it (Ctrl-C checkpoints it), or choose another run_id="


class RunLock:
    """The lock of ``run_dir``, held from :meth:`acquire` to :meth:`release` (or the end of the process)."""

    def __init__(self, run_dir: Path, advice: str = TRAINING_RUN_ADVICE):
        """``advice``: what a second process is told to do about the run in use."""
        self.run_dir, self.advice = run_dir, advice
        self._fd: int | None = None
        self._created_dir = False

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    def acquire(self) -> None:
        """Lock the run directory (created when missing); a HarnessError naming the holder when another process has
        it."""
        self._created_dir = not self.run_dir.exists()
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _wait_for_holder(fd)
                os.close(fd)
                raise HarnessError(f"{self.run_dir} is in use by {holder}; {self.advice}") from None
            except OSError as exc:  # a file system without locks (some network mounts)
                os.close(fd)
                raise HarnessError(f"cannot lock {self.path}: {exc.strerror}; choose a results_dir= on a local "
                                   f"disk") from None
            if _is_current_file(fd, self.path):
                break
            os.close(fd)  # the directory was moved or removed between our open and our lock: lock what is there now
        _write_holder(fd)
        self._fd = fd

    def _open(self) -> int:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise HarnessError(f"cannot create {self.path}: {exc.strerror}; choose a writable place for it") from None

    def move_run_aside(self, destination: Path) -> None:
        """Rename the locked run directory to ``destination`` (one atomic rename; the lock moves with it) and lock a
        fresh, empty run directory in its place."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.run_dir, destination)
        moved = self._fd
        try:
            self.acquire()
        finally:
            os.close(moved)

    def release(self) -> None:
        """Unlock; a run directory this lock created and nothing else was written to is removed again."""
        if self._fd is None:
            return
        if self._created_dir and [p.name for p in self.run_dir.glob("*")] == [LOCK_NAME]:
            self.path.unlink()
            self.run_dir.rmdir()
        os.close(self._fd)
        self._fd = None


def _is_current_file(fd: int, path: Path) -> bool:
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(sys.orig_argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)


def _wait_for_holder(fd: int) -> str:
    """The holder as its lock file names it. A holder writes itself just after it locks, so a lock found with no
    holder written yet is read again for a few seconds (a loaded machine can deschedule the holder in between)."""
    deadline = time.monotonic() + HOLDER_WRITE_WAIT_S
    while (holder := _read_holder(fd)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if holder is None:
        return "another process (it has not written its pid yet)"
    return (f"pid {holder['pid']} on host {holder.get('host', '?')} (started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')})")


def _read_holder(fd: int) -> dict | None:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:  # caught between the holder's truncate and its write
        return None
    return holder if "pid" in holder else None
