"""The dataset manifest: what a shard directory holds and how it was built.

It carries no timestamps so that a build interrupted and resumed writes a byte-identical
dataset to one built in one go.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ricefm.atomic import write_json_atomic
from ricefm.errors import RiceFMInputError
from ricefm.integrity import table_problems

FORMAT_NAME = "ricefm-cell-shards"
FORMAT_VERSION = 2  # 2: CRC32C per chunk, every chunk stored, per-file sizes and SHA-256 in the manifest
MANIFEST_NAME = "manifest.json"
MODALITY_NAMES = ("scrna", "spatial")


@dataclass
class Manifest:
    data: dict[str, Any]

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.data["shards"]

    @property
    def vocab_sha256(self) -> str:
        return self.data["vocab_sha256"]

    @property
    def obs_columns(self) -> dict[str, list[str]]:
        return self.data["obs_columns"]

    @property
    def total_bytes(self) -> int:
        """Bytes of all shard files, as recorded."""
        return sum(int(f["bytes"]) for s in self.shards for f in s.get("files", {}).values())

    def problems(self, directory: Path, full: bool, share: tuple[int, int] = (0, 1),
                 on_bytes: Callable[[int], object] | None = None) -> list[str]:
        """Shard files that differ from this manifest. Cheap (``full`` False): presence and size of
        every file and the digests of the zarr metadata; full: every digest, of this ``(rank, world)``
        share of the shards (so that processes opening one dataset split the work)."""
        found = []
        rank, world = share
        for k, shard in enumerate(self.shards):
            if full and k % world != rank:
                continue
            found += [f"{shard['name']}/{p}" for p in table_problems(
                Path(directory) / shard["name"], shard["files"], full, on_bytes, lambda rel: rel.endswith("zarr.json"))]
        return found

    def save(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST_NAME, self.data)


def load_manifest(directory: str | Path, require_complete: bool = True) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise RiceFMInputError(f"{directory}: not a riceFM dataset (no {MANIFEST_NAME}); build one with `ricefm build-data`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RiceFMInputError(f"{path}: unreadable manifest ({e}); rebuild the dataset") from None
    if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
        raise RiceFMInputError(
            f"{path}: format {data.get('format')!r} v{data.get('format_version')} is not "
            f"{FORMAT_NAME} v{FORMAT_VERSION}; rebuild it with this version's `ricefm build-data`")
    manifest = Manifest(data)
    if require_complete and not manifest.complete:
        raise RiceFMInputError(
            f"{path}: dataset is incomplete (an interrupted build); re-run the same `ricefm build-data` command to finish it")
    return manifest
