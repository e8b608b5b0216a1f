"""One training per run folder: an exclusive lock on ``<run>/.lock`` that dies with its process.

The lock is a POSIX record lock (``fcntl.lockf``) on the file, which the kernel drops when the
process holding it ends, however it ends (a kill, a crash, a power cut on reboot): a dead run never
blocks the next one. Record locks are not inherited by forked children (data-loading workers), so
they do not outlive the trainer either. The file holds the holder's pid, host and start time, for
the message the second process shows. On platforms without ``fcntl`` the lock does nothing.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

from .config import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLock", "RunLockError"]

LOCK_NAME = ".lock"
_held: dict[str, RunLock] = {}  # record locks are per process: refuse a second one on the same file here
_held_guard = threading.Lock()


class RunLockError(ConfigError):
    """Another live process (or this one) is already training in the run folder."""


class RunLock:
    """Exclusive lock of the run folder ``out_dir`` (created when missing).

        lock = RunLock(out)
        lock.acquire()       # RunLockError naming the holder's pid and host if another run holds it
        try:
            ...              # train
        finally:
            lock.release()

    or ``with RunLock(out): ...``. Never blocks: a folder in use is an error at once.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockError` naming the process that holds it."""
        if self._fd is not None:
            return
        key = str(self.path.resolve())
        with _held_guard:
            if key in _held:
                # (reading the file here would close a descriptor of it, which drops this process's lock)
                raise RunLockError(f"{self.out_dir} is already in use by a training in this process "
                                   f"(pid {os.getpid()}); use another --out")
            if fcntl is None:
                return
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunLockError(
                    f"{self.out_dir} is in use by another training ({_holder_text(self.path)}); two runs in one "
                    f"folder would overwrite each other's checkpoints. Wait for it to end or stop it, or choose "
                    f"another --out (the lock {self.path} is released as soon as that process ends)") from None
            info = f"pid {os.getpid()}\nhost {socket.gethostname()}\nstarted {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
            self._fd = fd
            _held[key] = self

    def release(self) -> None:
        """Let go of the lock (nothing if not held). The file stays: removing it would race a newcomer."""
        if self._fd is None:
            return
        with _held_guard:
            _held.pop(str(self.path.resolve()), None)
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the record lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder_text(path: Path) -> str:
    """'pid 123 on host h, started ...' from the lock file (it may be empty for a moment)."""
    for _ in range(20):
        try:
            fields = dict(line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)
        except OSError:
            fields = {}
        if "pid" in fields:
            return f"pid {fields['pid']} on host {fields.get('host', '?')}, started {fields.get('started', '?')}"
        time.sleep(0.05)
    return "holder unknown"
