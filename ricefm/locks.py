"""Exclusive advisory locks: one build per output, one training run per workdir.

The lock is ``flock`` on a small file that also names its holder (host, pid, command, start), so
a refused process can say who holds it. The kernel drops an ``flock`` when its holder dies, so a
lock file left by a killed run is stale by construction and is simply taken over. On a file
system without ``flock`` the holder's record decides: a dead pid on this host is stale; a holder
on another host is trusted until its lock file is deleted.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from ricefm.errors import RiceFMInputError

try:
    import fcntl
except ImportError:  # Windows: the holder's record alone decides
    fcntl = None


class LockHeld(RiceFMInputError):
    """Another live process holds the lock (exit 2, the line names the holder)."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    if not h:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
    return f"pid {h.get('pid')} on {h.get('host')} (`{h.get('command', '?')}`, since {started})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ExclusiveLock:
    """Held from :meth:`acquire` to :meth:`release` (or the process's end)."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self) -> "ExclusiveLock":
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RiceFMInputError(f"{self.what}: cannot create {self.path} ({e.strerror}); "
                                       "choose a location you can write to") from None
            try:
                if not self._lock(fd):
                    raise LockHeld(f"{self.what} is in use by {_describe(_holder(self.path))}; wait for it to finish "
                                   f"or stop it (lock file {self.path})")
                try:  # the file we locked may have been removed by a holder releasing just now: retry
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:200],
                  "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def _lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        holder = _holder(self.path)  # no flock here: the holder's record decides
        if not holder or holder.get("pid") == os.getpid():
            return True
        if holder.get("host") == socket.gethostname():
            return not _alive(int(holder.get("pid", 0)))
        return False

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "ExclusiveLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
