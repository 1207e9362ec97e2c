"""Digests of the files of a dataset or a checkpoint, written when they are made and checked when
they are read, so damaged or missing files stop a run with one line instead of feeding it garbage.

A checkpoint folder carries ``checksums.sha256`` (the ``sha256sum`` format, so ``sha256sum -c``
checks it too); a dataset's manifest records, per shard, every file's size and SHA-256.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

from ricefm.atomic import write_bytes_atomic
from ricefm.errors import RiceFMInputError

CHECKSUMS = "checksums.sha256"
_BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike, on_bytes: Callable[[int], object] | None = None) -> str:
    """The file's SHA-256; ``on_bytes(n)`` after every block read (a progress bar's ``update``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return h.hexdigest()


def folder_files(folder: Path, skip: Iterable[str] = ()) -> list[str]:
    """Every regular file under ``folder``, as sorted POSIX paths relative to it."""
    skip = set(skip)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel not in skip:
                found.append(rel)
    return sorted(found)


def file_table(folder: Path) -> dict[str, dict[str, object]]:
    """``{relative path: {"bytes": size, "sha256": digest}}`` of every file under ``folder``."""
    return {rel: {"bytes": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
            for rel in folder_files(folder)}


def table_problems(folder: Path, table: Mapping[str, Mapping[str, object]], full: bool,
                   on_bytes: Callable[[int], object] | None = None, always_hash: Callable[[str], bool] = lambda r: False
                   ) -> list[str]:
    """What differs between ``folder`` and its recorded ``table``: missing files, wrong sizes and,
    for files hashed (all when ``full``, else those ``always_hash`` picks), wrong digests."""
    problems = []
    for rel, want in table.items():
        path = folder / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel} is missing")
            continue
        if size != want["bytes"]:
            problems.append(f"{rel} has {size} bytes, recorded {want['bytes']}")
        elif (full or always_hash(rel)) and sha256_file(path, on_bytes) != want["sha256"]:
            problems.append(f"{rel} has changed (SHA-256 differs from the recorded one)")
    return problems


def object_table_problems(read: Callable[[str], bytes | None], present: set[str],
                          table: Mapping[str, Mapping[str, object]], full: bool,
                          on_bytes: Callable[[int], object] | None = None,
                          always_hash: Callable[[str], bool] = lambda r: False) -> list[str]:
    """``table_problems`` for objects in a store: presence from a listing (``present``), size and
    digest from reading the objects that are hashed (all when ``full``)."""
    problems = []
    for rel, want in table.items():
        if rel not in present:
            problems.append(f"{rel} is missing")
        elif full or always_hash(rel):
            data = read(rel) or b""
            if on_bytes is not None:
                on_bytes(len(data))
            if len(data) != want["bytes"]:
                problems.append(f"{rel} has {len(data)} bytes, recorded {want['bytes']}")
            elif hashlib.sha256(data).hexdigest() != want["sha256"]:
                problems.append(f"{rel} has changed (SHA-256 differs from the recorded one)")
    return problems


def seal(folder: str | os.PathLike) -> None:
    """Write ``folder/checksums.sha256`` covering every other file in it (atomically)."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / rel)}  {rel}\n" for rel in folder_files(folder, skip=(CHECKSUMS,))]
    write_bytes_atomic(folder / CHECKSUMS, "".join(lines).encode())


def read_seal(folder: str | os.PathLike) -> dict[str, str] | None:
    """The digests ``seal`` recorded, or None for a folder without them (e.g. made by other software)."""
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        return None
    digests = {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise RiceFMInputError(f"{path}: line {n} is not '<sha256>  <file>'; the checkpoint's digest file is damaged")
        digests[rel] = digest
    return digests


def seal_problems(folder: str | os.PathLike, on_bytes: Callable[[int], object] | None = None) -> list[str] | None:
    """Mismatches between a sealed folder and its files (empty: intact); None when it has no seal."""
    folder = Path(folder)
    digests = read_seal(folder)
    if digests is None:
        return None
    problems = []
    for rel, digest in digests.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(path, on_bytes) != digest:
            problems.append(f"{rel} has changed (SHA-256 differs from {CHECKSUMS})")
    return problems


def summarize(problems: list[str], limit: int = 3) -> str:
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def check_sealed(folder: str | os.PathLike, what: str = "checkpoint") -> None:
    """Refuse a sealed folder whose files do not match their digests (a folder without a seal passes)."""
    problems = seal_problems(folder)
    if problems:
        raise RiceFMInputError(f"{folder}: damaged {what}: {summarize(problems)}; restore it from a copy "
                               f"(`ricefm verify {folder}` lists every file)")
