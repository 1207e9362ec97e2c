"""``ricefm verify PATH|URL``: check every byte of a dataset or a checkpoint against its recorded digests.

A dataset (``manifest.json``) is checked file by file against the manifest (size and SHA-256 of
every shard file, the vocabulary against ``vocab_sha256``); a folder with ``checksums.sha256``
(every checkpoint written by riceFM, a torch ``latest/``, a JAX step folder) against that file; a
checkpoint without digests (e.g. the published download) is loaded once in full instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from ricefm.errors import RiceFMInputError
from ricefm.integrity import CHECKSUMS, folder_files, read_seal, seal_problems
from ricefm.shards.manifest import MANIFEST_NAME, load_manifest
from ricefm.storage import Location, is_remote
from ricefm.vocab import GeneVocab


def _dataset(loc: Location, bar: tqdm, count: Callable[[int], None]) -> tuple[str, int, list[str]]:
    manifest = load_manifest(loc)
    bar.reset(total=manifest.total_bytes)
    problems = manifest.problems(loc, full=True, on_bytes=count)
    try:
        raw = loc.read("vocab.json")
        if raw is None:
            problems.append("vocab.json is missing")
        elif GeneVocab.from_json(raw, loc.show("vocab.json")).sha256() != manifest.vocab_sha256:
            problems.append("vocab.json differs from the manifest's vocab_sha256")
    except RiceFMInputError as e:
        problems.append(str(e))
    return "dataset", sum(len(s.get("files", {})) for s in manifest.shards), problems


def _sealed(path: Path, bar: tqdm, count: Callable[[int], None]) -> tuple[str, int, list[str]]:
    digests = read_seal(path) or {}
    bar.reset(total=sum((path / r).stat().st_size for r in digests if (path / r).is_file()))
    problems = seal_problems(path, on_bytes=count) or []
    extra = sorted(set(folder_files(path, skip=(CHECKSUMS,))) - set(digests))
    problems += [f"{rel} is not in {CHECKSUMS} (added after the checkpoint was written)" for rel in extra]
    return "checkpoint", len(digests), problems


def _unsealed(path: Path) -> tuple[str, int, list[str]]:
    from converters.formats import load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except RiceFMInputError as e:
        return "checkpoint without digests", 0, [str(e)]
    return f"{ckpt.format} checkpoint without digests (read in full)", len(folder_files(path)), []


def verify(path: str | Path, progress: bool = True) -> dict[str, Any]:
    """Check ``path`` (a folder, or a dataset's URL) fully; a report with ``problems`` (empty:
    intact), bytes and MB/s."""
    remote = is_remote(path)
    if not remote:
        path = Path(path)
        if not path.is_dir():
            raise RiceFMInputError(f"{path}: not found, or not a folder; pass a dataset or checkpoint folder")
    start = time.perf_counter()
    with tqdm(total=0, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
        read = 0

        def count(n: int) -> None:
            nonlocal read
            read += n
            bar.update(n)

        if remote or (path / MANIFEST_NAME).is_file():
            kind, files, problems = _dataset(Location.parse(path), bar, count)
        elif (path / CHECKSUMS).is_file():
            kind, files, problems = _sealed(path, bar, count)
        else:
            kind, files, problems = _unsealed(path)
    seconds = time.perf_counter() - start
    return {"path": Location.parse(path).url if remote else str(path), "kind": kind, "files": files,
            "bytes": int(read), "seconds": seconds,
            "mb_per_s": read / 1e6 / seconds if seconds > 0 and read else None, "problems": problems}


def format_report(r: dict[str, Any]) -> str:
    checked = f", {r['bytes'] / 1e6:.1f} MB checked at {r['mb_per_s']:.0f} MB/s" if r["mb_per_s"] else ""
    head = f"{r['path']}: {r['kind']}, {r['files']} files{checked}"
    if not r["problems"]:
        return head + ": intact"
    return "\n".join([head + f": {len(r['problems'])} problem(s)", *(f"  {p}" for p in r["problems"])])
