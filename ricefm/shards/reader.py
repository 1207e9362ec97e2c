"""Random access to the cells of a built dataset, NumPy only.

A read of any set of cells costs one batched TensorStore read per requested array and shard
touched. Only a shard's per-cell index (offsets and modality, 9 bytes a cell) is kept in
memory; the per-non-zero arrays are never read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tensorstore as ts

from ricefm.errors import RiceFMInputError
from ricefm.integrity import summarize
from ricefm.shards import store
from ricefm.shards.manifest import Manifest, load_manifest
from ricefm.storage import Location
from ricefm.vocab import GeneVocab


@dataclass
class CellBatch:
    """Cells in CSR layout: cell i owns ``flat[starts[i]:starts[i] + lengths[i]]``, in request order."""

    indices: np.ndarray  # global cell index
    lengths: np.ndarray  # int64
    modality: np.ndarray  # int8
    arrays: dict[str, np.ndarray]  # flat per-non-zero arrays ("gene_ids", "bins", "values")

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def cell(self, i: int, name: str) -> np.ndarray:
        s = int(self.starts[i])
        return self.arrays[name][s:s + int(self.lengths[i])]

    def rows(self, start: int, stop: int) -> "CellBatch":
        """Cells ``start:stop`` (views of the flat arrays: their non-zeros are contiguous)."""
        lo, hi = int(self.lengths[:start].sum()), int(self.lengths[:stop].sum())
        return CellBatch(self.indices[start:stop], self.lengths[start:stop], self.modality[start:stop],
                         {k: v[lo:hi] for k, v in self.arrays.items()})


@dataclass
class PendingRead:
    """Reads in flight for a :class:`CellBatch`."""

    indices: np.ndarray
    lengths: np.ndarray
    modality: np.ndarray
    futures: dict[str, list]
    shards: list[int]
    reader: "ShardedCells"
    done: CellBatch | None = None  # assembled once, however many steps share the read

    def result(self) -> CellBatch:
        if self.done is not None:
            return self.done
        arrays = {}
        for name, futs in self.futures.items():
            parts = [self.reader._result(k, name, f) for k, f in zip(self.shards, futs)]
            arrays[name] = np.concatenate(parts) if parts else np.zeros(0, store.NONZERO_ARRAYS[name])
        self.done = CellBatch(indices=self.indices, lengths=self.lengths, modality=self.modality, arrays=arrays)
        return self.done


class ShardedCells:
    """The cells of a dataset directory, addressed by a global index 0..n_cells-1."""

    def __init__(self, directory: str | Path | Location):
        """``directory``: a folder, or a URL (``s3://bucket/prefix``, ``gs://...``, ``file://...``)."""
        self.location = directory if isinstance(directory, Location) else Location.parse(directory)
        # what messages and worker processes are given: the folder, or the URL
        self.directory: Path | str = self.location.url if self.location.remote else self.location.path
        self.manifest: Manifest = load_manifest(self.location)
        raw = self.location.read("vocab.json")
        if raw is None:
            raise RiceFMInputError(f"{self.location.show('vocab.json')} is missing; the dataset is damaged: rebuild it")
        self.vocab = GeneVocab.from_json(raw, self.location.show("vocab.json"))
        if self.vocab.sha256() != self.manifest.vocab_sha256:
            raise RiceFMInputError(f"{self.location.show('vocab.json')} does not match the manifest's vocab_sha256; "
                                   "rebuild the dataset")
        counts = [s["n_cells"] for s in self.manifest.shards]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._open: dict[tuple[int, str], object] = {}
        self._index: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._check(self.problems(full=False))

    def problems(self, full: bool, share: tuple[int, int] = (0, 1), on_bytes: Callable[[int], object] | None = None
                 ) -> list[str]:
        """See :meth:`Manifest.problems`."""
        return self.manifest.problems(self.location, full, share, on_bytes)

    def verify(self, share: tuple[int, int] = (0, 1)) -> None:
        """Check every digest of this process's share of the shards (see :meth:`problems`)."""
        self._check(self.problems(full=True, share=share))

    def _check(self, problems: list[str]) -> None:
        if problems:
            raise RiceFMInputError(f"{self.directory}: damaged dataset: {summarize(problems)}; rebuild it with "
                                   f"`ricefm build-data` (`ricefm verify {self.directory}` lists every file)")

    def _result(self, shard: int, name: str, future) -> np.ndarray:
        """A read's data; a damaged or missing chunk (CRC32C, fill_missing_data_reads) is one line."""
        try:
            return future.result()
        except ValueError as e:
            where = self.location.show(f"{self.manifest.shards[shard]['name']}/{name}")
            reason = str(e).split(":")[0]
            raise RiceFMInputError(f"{where}: unreadable chunk ({reason}: {str(e)[len(reason) + 1:].strip()[:160]}); "
                                   f"the dataset is damaged: `ricefm verify {self.directory}`, then rebuild it") from None

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    def _array(self, shard: int, name: str):
        key = (shard, name)
        if key not in self._open:
            rel = f"{self.manifest.shards[shard]['name']}/{name}"
            path = self.location.show(rel)
            try:
                self._open[key] = store.open_array(self.location.kvstore(rel + "/"))
            except ValueError as e:
                raise RiceFMInputError(f"{path}: cannot open ({str(e)[:160]}); the dataset is damaged: "
                                       f"`ricefm verify {self.directory}`, then rebuild it") from None
        return self._open[key]

    def _cell_index(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """A shard's per-cell offsets and modality (9 bytes a cell), read once and kept."""
        if shard not in self._index:
            self._index[shard] = (self._result(shard, "offsets", self._array(shard, "offsets").read()),
                                  self._result(shard, "modality", self._array(shard, "modality").read()))
        return self._index[shard]

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"cell index out of range 0..{len(self) - 1}")
        shard = np.searchsorted(self.shard_starts, indices, side="right") - 1
        return shard, indices - self.shard_starts[shard]

    def read(self, indices: Sequence[int] | np.ndarray, arrays: Sequence[str] = ("gene_ids", "bins")) -> CellBatch:
        return self.read_async(indices, arrays).result()

    def read_async(self, indices: Sequence[int] | np.ndarray, arrays: Sequence[str] = ("gene_ids", "bins")
                   ) -> "PendingRead":
        """Issue the reads for some cells and return at once; ``.result()`` assembles the batch.

        One ``ts.Batch`` of per-cell slices per array (TensorStore coalesces them into few I/O
        requests, which beats an index-array read).
        """
        indices = np.asarray(indices, dtype=np.int64)
        shard, local = self._locate(indices)
        lengths = np.zeros(len(indices), np.int64)
        starts = np.zeros(len(indices), np.int64)
        modality = np.zeros(len(indices), np.int8)
        for k in np.unique(shard):
            sel = np.flatnonzero(shard == k)
            loc = local[sel]
            offsets, shard_modality = self._cell_index(k)
            starts[sel] = offsets[loc]
            lengths[sel] = offsets[loc + 1] - starts[sel]
            modality[sel] = shard_modality[loc]
        futures = {a: [] for a in arrays}
        with ts.Batch() as batch:
            for a in arrays:
                for k, s, n in zip(shard.tolist(), starts.tolist(), lengths.tolist()):
                    futures[a].append(self._array(k, a)[s:s + n].read(batch=batch))
        return PendingRead(indices, lengths, modality, futures, shard.tolist(), self)

    def obs_codes(self, column: str) -> tuple[np.ndarray, list[str]]:
        """Integer codes of a kept obs column for every cell (-1 = missing), and its categories."""
        if column not in self.manifest.obs_columns:
            raise RiceFMInputError(
                f"{self.directory}: obs column {column!r} was not kept; kept: {list(self.manifest.obs_columns) or 'none'} "
                "(rebuild with --keep-obs)")
        codes = [self._result(k, f"obs/{column}", self._array(k, f"obs/{column}").read())
                 for k in range(len(self.manifest.shards))]
        return np.concatenate(codes), list(self.manifest.obs_columns[column])

    def lengths(self) -> np.ndarray:
        """Stored genes per cell, every cell (from the per-cell index: no per-gene data is read)."""
        return np.concatenate([np.diff(self._cell_index(k)[0]) for k in range(len(self.manifest.shards))])

    def modality(self) -> np.ndarray:
        return np.concatenate([self._cell_index(k)[1] for k in range(len(self.manifest.shards))])
