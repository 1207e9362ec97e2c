"""Atomic writes: a file or a whole folder is written under a temporary sibling name, then renamed
over the target, so nobody ever reads half of one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary sibling of ``path`` for the block to write (``suffix`` for writers that check the
    extension), renamed over ``path`` when the block succeeds and removed when it fails. Concurrent
    writers each write their own sibling, so none of them reads or locks a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def json_bytes(obj: Any) -> bytes:
    """The bytes riceFM writes for a JSON file (one layout everywhere, so copies compare equal)."""
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, json_bytes(obj))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # e.g. a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _load_renameat2():
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):  # no C library to ask (e.g. Windows)
        return None


_RENAMEAT2, _AT_FDCWD, _RENAME_EXCHANGE = _load_renameat2(), -100, 2


def _siblings(target: Path) -> tuple[Path, Path]:
    return target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")


def recover_dir(target: str | os.PathLike) -> None:
    """Finish or undo a :func:`staged_dir` swap that a kill interrupted, whatever the kill point.

    A ``.old`` sibling means the two-rename fallback had started, so the ``.tmp`` sibling is complete:
    if the target is missing, the new folder goes in. Any other ``.tmp`` is either a half-written new
    folder (the swap never started) or the old folder after an exchange: it goes.
    """
    target = Path(target)
    tmp, old = _siblings(target)
    if old.exists():
        if not target.exists():
            os.replace(tmp if tmp.exists() else old, target)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target``; when the block succeeds it replaces ``target``.

    A reader sees the old folder or the new one, never half of one, and never none once one was
    written: the swap is one atomic exchange of the two folders where the OS has it (Linux), else
    two renames that :func:`recover_dir` (run first here, and by whoever opens ``target`` after a
    crash) completes. A failed block leaves ``target`` as it was and no temporary folder behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp, old = _siblings(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
        return
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
