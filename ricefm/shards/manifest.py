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
from ricefm.integrity import object_table_problems, table_problems
from ricefm.storage import Location

FORMAT_NAME = "ricefm-cell-shards"
FORMAT_VERSION = 2  # 2: CRC32C per chunk, every chunk stored, per-file sizes and SHA-256 in the manifest
MANIFEST_NAME = "manifest.json"
MODALITY_NAMES = ("scrna", "spatial")
# in an object store, a build in progress keeps one completion record per finished shard under
# PREFIX/_building/ (deleted once manifest.json, always the last object written, is there)
BUILDING = "_building"


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

    def problems(self, directory: str | Path | Location, full: bool, share: tuple[int, int] = (0, 1),
                 on_bytes: Callable[[int], object] | None = None) -> list[str]:
        """Shard files that differ from this manifest. Cheap (``full`` False): presence and size of
        every file (in an object store: presence) and the digests of the zarr metadata; full: every
        digest, of this ``(rank, world)`` share of the shards (so that processes opening one dataset
        split the work)."""
        loc = directory if isinstance(directory, Location) else Location.parse(directory)
        found = []
        rank, world = share
        present = set(loc.keys()) if loc.remote else set()
        for k, shard in enumerate(self.shards):
            if full and k % world != rank:
                continue
            name = shard["name"]
            if loc.remote:
                bad = object_table_problems(lambda rel: loc.read(f"{name}/{rel}"),
                                            {key[len(name) + 1:] for key in present if key.startswith(name + "/")},
                                            shard["files"], full, on_bytes, _metadata_file)
            else:
                bad = table_problems(loc.path / name, shard["files"], full, on_bytes, _metadata_file)
            found += [f"{name}/{p}" for p in bad]
        return found

    def save(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST_NAME, self.data)


def _metadata_file(rel: str) -> bool:
    return rel.endswith("zarr.json")


def load_manifest(directory: str | Path | Location, require_complete: bool = True) -> Manifest:
    loc = directory if isinstance(directory, Location) else Location.parse(directory)
    path = loc.show(MANIFEST_NAME)
    raw = loc.read(MANIFEST_NAME)
    if raw is None:
        if loc.remote:
            keys = loc.keys()  # a missing bucket or denied credentials fail here, with the reason
            if any(k.startswith(BUILDING + "/") for k in keys):
                raise RiceFMInputError(f"{loc.url}: an unfinished build-data (no {MANIFEST_NAME} yet, shards uploaded: "
                                       f"{sum(k.startswith(BUILDING + '/') for k in keys)}); re-run the same "
                                       "`ricefm build-data` command to finish it")
        raise RiceFMInputError(f"{loc.url}: not a riceFM dataset (no {MANIFEST_NAME}); build one with `ricefm build-data`")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
