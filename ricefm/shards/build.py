"""Build a sharded cell dataset from one or many ``.h5ad`` files.

Every input is validated (genes, vocabulary overlap, obs columns, modality) before anything is
written. The dataset is assembled in ``OUTPUT.partial/`` and renamed to ``OUTPUT`` only when all
shards are done, so a finished dataset is never half-written. Each shard is written into a
temporary folder and renamed when complete, and the manifest records it; re-running the same
command after an interruption rebuilds only the missing shards. Values that are not raw counts
(negative, NaN, infinite; non-integer unless ``allow_non_counts``) abort the build and remove the
partial output: a sample of each file is checked before anything is written
(``H5adSource.check_counts``), and every block as it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ricefm.atomic import json_bytes, staged_dir
from ricefm.binning import bin_cells
from ricefm.errors import RiceFMInputError
from ricefm.gene_maps import load_gene_map
from ricefm.integrity import file_table
from ricefm.locks import ExclusiveLock
from ricefm.shards import store
from ricefm.shards.manifest import (BUILDING, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, MODALITY_NAMES, Manifest,
                                   load_manifest)
from ricefm.shards.gene_space import VocabMapping, modality_codes, translated_genes
from ricefm.shards.sources import H5adSource
from ricefm.storage import Location, is_remote
from ricefm.vocab import GeneVocab

DEFAULT_CELLS_PER_SHARD = 100_000
DEFAULT_MIN_GENE_FRACTION = 0.10

# Fault injection for tests: SIGKILL the build after this many blocks (a real, uncatchable kill).
_KILL_AFTER_BLOCKS_ENV = "RICEFM_TEST_KILL_AFTER_BLOCKS"


@dataclass
class BuildOptions:
    layer: str | None = None
    gene_column: str | None = None
    modality: str = "scrna"
    keep_obs: tuple[str, ...] = ()
    cells_per_shard: int = DEFAULT_CELLS_PER_SHARD
    gene_map: str | None = None
    min_gene_fraction: float = DEFAULT_MIN_GENE_FRACTION
    build_vocab: bool = False
    allow_non_counts: bool = False  # build from normalized / log values knowingly (recorded in the manifest)
    block_cells: int = 1024  # rows read per step (bounds memory); not part of the dataset's identity

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "gene_column": self.gene_column, "modality": self.modality,
                "keep_obs": list(self.keep_obs), "cells_per_shard": self.cells_per_shard,
                "gene_map": self.gene_map, "min_gene_fraction": self.min_gene_fraction,
                "build_vocab": self.build_vocab, "allow_non_counts": self.allow_non_counts}


@dataclass
class _Input:
    source: H5adSource
    mapping: VocabMapping
    modality: np.ndarray  # int8 per cell
    obs_codes: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def _plan_inputs(paths: Sequence[str | Path], opts: BuildOptions, vocab_path: str | Path | None
                 ) -> tuple[list[_Input], GeneVocab, dict[str, list[str]]]:
    sources: list[H5adSource] = []
    try:
        for p in paths:
            sources.append(H5adSource.open(p, layer=opts.layer, gene_column=opts.gene_column))
            sources[-1].require_integers = not opts.allow_non_counts
        counts = [s.check_counts() for s in sources]  # a sample first, so that normalized data stops at once
        gene_map = load_gene_map(opts.gene_map) if opts.gene_map else None
        mapped_genes = [translated_genes(s, gene_map) for s in sources]
        if opts.build_vocab:
            vocab = GeneVocab.from_genes(sorted(set().union(*(set(g) for g, _ in mapped_genes))))
        else:
            vocab = GeneVocab.load(vocab_path) if vocab_path is not None else GeneVocab.default()
        categories: dict[str, list[str]] = {}
        for column in opts.keep_obs:
            values: set[str] = set()
            for s in sources:
                values.update(s.obs_column(column, "--keep-obs").dropna().astype(str))
            categories[column] = sorted(values)
        inputs = []
        for s, (genes, n_by_table), sample in zip(sources, mapped_genes, counts):
            mapping = VocabMapping.build(s, genes, vocab, opts.min_gene_fraction, opts.gene_column, opts.gene_map,
                                         n_by_table)
            obs_codes = {}
            for column, cats in categories.items():
                col = s.obs_column(column, "--keep-obs")
                labels = [None if pd.isna(v) else str(v) for v in col.astype(object)]
                obs_codes[column] = pd.Categorical(labels, categories=cats).codes.astype(store.OBS_DTYPE)  # missing: -1
            inputs.append(_Input(
                source=s, mapping=mapping, modality=modality_codes(s, opts.modality), obs_codes=obs_codes,
                stats={"path": str(s.path.resolve()), "field": s.field, "n_obs": s.n_obs, "n_vars": s.n_vars,
                       "file_bytes": s.path.stat().st_size, **mapping.stats, "counts_check": sample}))
        return inputs, vocab, categories
    except BaseException:
        for s in sources:
            s.close()
        raise


class _ShardWriter:
    """Appends cells to the arrays of one shard; non-zero arrays are flushed in whole zarr shards."""

    def __init__(self, path: Path, categories: dict[str, list[str]]):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.arrays = {k: store.create_array(path / k, dt, per_nonzero=True) for k, dt in store.NONZERO_ARRAYS.items()}
        self.buffers: dict[str, list[np.ndarray]] = {k: [] for k in store.NONZERO_ARRAYS}
        self.buffered = 0
        self.cells: dict[str, list[np.ndarray]] = {k: [] for k in (*store.CELL_ARRAYS, *("obs/" + c for c in categories))}
        self.categories = categories
        self.n_nonzero = 0
        self.n_cells = 0

    def add(self, gene_ids, values, bins, lengths, modality, source_file, source_row, obs_codes) -> None:
        for k, a in (("gene_ids", gene_ids), ("values", values), ("bins", bins)):
            self.buffers[k].append(a)
        self.buffered += len(gene_ids)
        self.cells["offsets"].append(self.n_nonzero + np.cumsum(lengths))
        self.cells["modality"].append(modality)
        self.cells["source_file"].append(source_file)
        self.cells["source_row"].append(source_row)
        for c, codes in obs_codes.items():
            self.cells["obs/" + c].append(codes)
        self.n_nonzero += int(lengths.sum())
        self.n_cells += len(lengths)
        if self.buffered >= store.OUTER_CHUNK:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        n = self.buffered if final else (self.buffered // store.OUTER_CHUNK) * store.OUTER_CHUNK
        if n == 0:
            return
        for k, parts in self.buffers.items():
            flat = np.concatenate(parts)
            self.arrays[k] = store.append(self.arrays[k], flat[:n])
            self.buffers[k] = [flat[n:]]
        self.buffered -= n

    def close(self) -> dict[str, Any]:
        self._flush(final=True)
        cell_arrays = {"offsets": np.concatenate([[0], *self.cells["offsets"]])}
        for k, parts in self.cells.items():
            if k != "offsets":
                cell_arrays[k] = np.concatenate(parts) if parts else np.zeros(0)
        for k, a in cell_arrays.items():
            name = k.split("/")[-1]
            dtype = store.CELL_ARRAYS.get(k, store.OBS_DTYPE)
            attrs = {"categories": self.categories[name]} if k.startswith("obs/") else None
            arr = store.create_array(self.path / k, dtype, per_nonzero=False, attributes=attrs)
            store.append(arr, a.astype(dtype))
        modality_counts = np.bincount(cell_arrays["modality"].astype(np.int64), minlength=2).tolist()
        info = {"n_cells": self.n_cells, "n_nonzero": self.n_nonzero, "modality_counts": modality_counts}
        if self.categories:
            store.write_group(self.path / "obs", {})
        store.write_group(self.path, {"format": FORMAT_NAME, **info})
        return info


def _global_rows(inputs: list[_Input]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([i.source.n_obs for i in inputs])])


def _write_shard(k: int, rows: tuple[int, int], inputs: list[_Input], categories, staging: Path,
                 block_cells: int, progress: tqdm, kill_counter: list[int]) -> dict[str, Any]:
    final = staging / f"shard-{k:05d}"
    with staged_dir(final) as tmp:  # a killed build leaves no half shard under the final name
        info, dropped = _fill_shard(_ShardWriter(tmp, categories), rows, inputs, block_cells, progress, kill_counter)
        files = file_table(tmp)  # sizes and digests that readers and `ricefm verify` check
    return {"name": final.name, "complete": True, "rows": [rows[0], rows[1]], **info, "cells_dropped": dropped,
            "files": files}


def _fill_shard(writer: _ShardWriter, rows: tuple[int, int], inputs: list[_Input], block_cells: int,
                progress: tqdm, kill_counter: list[int]) -> tuple[dict[str, Any], dict[str, int]]:
    """Rows ``rows`` of the inputs into ``writer``: (the shard's info, cells dropped by reason)."""
    starts = _global_rows(inputs)
    dropped = {"no_counts": 0, "no_vocab_genes": 0}
    lo, hi = rows
    while lo < hi:
        f = int(np.searchsorted(starts, lo, side="right") - 1)
        inp = inputs[f]
        r0 = lo - int(starts[f])
        r1 = min(r0 + block_cells, inp.source.n_obs, hi - int(starts[f]))
        block = inp.source.read_rows(r0, r1)
        mapped = inp.mapping.apply(block)
        lengths = np.diff(mapped.indptr)
        empty_input = np.diff(block.indptr) == 0
        dropped["no_counts"] += int(empty_input.sum())
        dropped["no_vocab_genes"] += int(((lengths == 0) & ~empty_input).sum())
        keep = lengths > 0
        if keep.any():
            kept_rows = np.flatnonzero(keep)
            if not keep.all():
                mapped = mapped[kept_rows]
            lengths = np.diff(mapped.indptr)
            writer.add(mapped.indices.astype(np.int32), mapped.data, bin_cells(mapped.indptr, mapped.data), lengths,
                       inp.modality[r0:r1][keep], np.full(len(kept_rows), f, np.int32), r0 + kept_rows,
                       {c: codes[r0:r1][keep] for c, codes in inp.obs_codes.items()})
        progress.update(r1 - r0)
        lo = int(starts[f]) + r1
        kill_counter[0] += 1
        if kill_counter[0] == int(os.environ.get(_KILL_AFTER_BLOCKS_ENV, "-1")):
            os.kill(os.getpid(), signal.SIGKILL)
    return writer.close(), dropped


def _new_manifest(inputs: list[_Input], vocab: GeneVocab, categories, opts: BuildOptions) -> Manifest:
    total = int(_global_rows(inputs)[-1])
    cps = opts.cells_per_shard
    shards = [{"name": f"shard-{k:05d}", "complete": False, "rows": [lo, min(lo + cps, total)]}
              for k, lo in enumerate(range(0, total, cps))]
    return Manifest({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "complete": False,
        "vocab_sha256": vocab.sha256(), "vocab_size": len(vocab),
        "n_cells": None, "n_nonzero": None, "modality_counts": None, "cells_dropped": None,
        "obs_columns": categories, "build": opts.as_dict(),
        "sources": [i.stats for i in inputs], "shards": shards})


def _same_build(old: Manifest, new: Manifest) -> list[str]:
    diffs = []
    for key in ("vocab_sha256", "build", "obs_columns"):
        if old.data[key] != new.data[key]:
            diffs.append(key)
    old_src = [(s["path"], s["n_obs"], s["n_vars"], s["file_bytes"]) for s in old.data["sources"]]
    new_src = [(s["path"], s["n_obs"], s["n_vars"], s["file_bytes"]) for s in new.data["sources"]]
    if old_src != new_src:
        diffs.append("sources")
    return diffs


def build_dataset(inputs: Sequence[str | Path], output: str | Path, vocab_path: str | Path | None = None,
                  options: BuildOptions | None = None, progress: bool = True) -> dict[str, Any]:
    """Build (or finish building) a dataset; returns the final manifest as a dict."""
    opts = options or BuildOptions()
    if opts.cells_per_shard < 1:
        raise RiceFMInputError(f"--cells-per-shard must be >= 1, got {opts.cells_per_shard}")
    if not 0 <= opts.min_gene_fraction <= 1:
        raise RiceFMInputError(f"--min-gene-fraction {opts.min_gene_fraction}: a fraction between 0 and 1")
    if not inputs:
        raise RiceFMInputError("build-data needs at least one input .h5ad file")
    if is_remote(output):
        return _build_to_store(inputs, Location.parse(output), vocab_path, opts, progress)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise RiceFMInputError(f"--output {output}: is a file; choose a new folder")
    staging = output.with_name(output.name + ".partial")
    plan, vocab, categories = _plan_inputs(inputs, opts, vocab_path)
    lock = None
    try:
        # one build per output: a second one stops here, naming the first (the lock sits beside the dataset)
        lock = ExclusiveLock(output.with_name(output.name + ".lock"), f"--output {output}").acquire()
        fresh = _new_manifest(plan, vocab, categories, opts)
        if output.exists():
            if (output / MANIFEST_NAME).is_file():
                done = load_manifest(output)
                _check_same_build(done, fresh, str(output))
                return done.data
            if any(output.iterdir()):
                raise RiceFMInputError(f"{output}: exists and is not a riceFM dataset; choose another --output")
        if staging.exists() and not (staging / MANIFEST_NAME).is_file():
            shutil.rmtree(staging)  # killed before its first manifest: nothing to keep
        if staging.exists():
            manifest = load_manifest(staging, require_complete=False)
            diffs = _same_build(manifest, fresh)
            if diffs:
                raise RiceFMInputError(
                    f"{staging}: an interrupted build with different {', '.join(diffs)} is in the way; "
                    "re-run it with its original arguments, or delete that folder")
        else:
            staging.mkdir(parents=True)
            vocab.save(staging / "vocab.json")
            manifest = fresh
            manifest.save(staging)
        total = int(_global_rows(plan)[-1])
        done_cells = sum(s["rows"][1] - s["rows"][0] for s in manifest.shards if s["complete"])
        kill_counter = [0]
        with tqdm(total=total, initial=done_cells, unit="cell", desc="build-data", disable=not progress) as bar:
            for k, shard in enumerate(manifest.shards):
                if shard["complete"]:
                    continue
                try:
                    manifest.shards[k] = _write_shard(k, tuple(shard["rows"]), plan, categories, staging,
                                                     opts.block_cells, bar, kill_counter)
                except RiceFMInputError:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
                manifest.save(staging)
        try:
            _finish(manifest, inputs)
        except RiceFMInputError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        manifest.save(staging)
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
        return manifest.data
    finally:
        for i in plan:
            i.source.close()
        if lock is not None:
            lock.release()


def _finish(manifest: Manifest, inputs: Sequence[str | Path]) -> None:
    """The dataset totals, once every shard is written; a build that kept no cell is an error."""
    shards = manifest.shards
    manifest.data["n_cells"] = sum(s["n_cells"] for s in shards)
    manifest.data["n_nonzero"] = sum(s["n_nonzero"] for s in shards)
    counts = np.sum([s["modality_counts"] for s in shards], axis=0).tolist()
    manifest.data["modality_counts"] = dict(zip(MODALITY_NAMES, counts))
    manifest.data["cells_dropped"] = {r: sum(s["cells_dropped"][r] for s in shards) for r in ("no_counts", "no_vocab_genes")}
    if manifest.data["n_cells"] == 0:
        raise RiceFMInputError(f"{', '.join(map(str, inputs))}: no cell has a non-zero in-vocabulary gene; nothing to build")
    manifest.data["complete"] = True


def _check_same_build(done: Manifest, fresh: Manifest, where: str) -> None:
    if done.vocab_sha256 != fresh.vocab_sha256:
        raise RiceFMInputError(f"{where}: already holds a dataset built with another vocabulary "
                               f"(sha256 {done.vocab_sha256[:12]} vs {fresh.vocab_sha256[:12]}); choose another --output")
    diffs = _same_build(done, fresh)
    if diffs:
        raise RiceFMInputError(f"{where}: already holds a dataset built with different {', '.join(diffs)}; "
                               "choose another --output")


def _build_to_store(inputs: Sequence[str | Path], loc: Location, vocab_path, opts: BuildOptions,
                    progress: bool) -> dict[str, Any]:
    """Build into an object-store prefix: the same objects, byte for byte, as a local build.

    Object stores have no rename, so completeness is marked by order instead: each shard is
    written in a local temporary folder, its files uploaded, then its record (files, sizes,
    digests) is written to ``PREFIX/_building/shard-NNNNN.json``; ``vocab.json`` and, last,
    ``manifest.json`` follow, and the records are deleted. Readers refuse a prefix without
    ``manifest.json``. A re-run finds the records of a killed build and writes only the shards
    without one (a record is trusted only for the same build: inputs, options and vocabulary).
    """
    plan, vocab, categories = _plan_inputs(inputs, opts, vocab_path)
    try:
        fresh = _new_manifest(plan, vocab, categories, opts)
        raw = loc.read(MANIFEST_NAME)
        if raw is not None:
            done = load_manifest(loc)
            _check_same_build(done, fresh, loc.url)
            return done.data
        keys = loc.keys()  # a missing bucket or refused credentials stop here, before any work
        ours = {f"{s['name']}/" for s in fresh.shards} | {BUILDING + "/", "vocab.json"}
        foreign = [k for k in keys if not any(k == o or k.startswith(o) for o in ours)]
        if foreign:
            raise RiceFMInputError(f"{loc.url}: holds other objects ({foreign[0]}, ...) and no riceFM dataset; "
                                   "choose an empty prefix for --output")
        build_id = hashlib.sha256(json_bytes({k: fresh.data[k] for k in ("vocab_sha256", "build", "obs_columns")}
                                             | {"sources": [(s["path"], s["n_obs"], s["n_vars"], s["file_bytes"])
                                                            for s in fresh.data["sources"]]})).hexdigest()
        manifest = fresh
        total = int(_global_rows(plan)[-1])
        records = {}
        for k, shard in enumerate(manifest.shards):
            raw = loc.read(f"{BUILDING}/{shard['name']}.json")
            if raw is not None:
                record = json.loads(raw)
                if record.get("build_id") == build_id and record["shard"]["rows"] == shard["rows"]:
                    records[k] = record["shard"]
        kill_counter = [0]
        done_cells = sum(manifest.shards[k]["rows"][1] - manifest.shards[k]["rows"][0] for k in records)
        with tempfile.TemporaryDirectory(prefix="ricefm-build-") as tmp, \
                tqdm(total=total, initial=done_cells, unit="cell", desc=f"build-data -> {loc.url}",
                     disable=not progress) as bar:
            for k, shard in enumerate(manifest.shards):
                if k in records:
                    manifest.shards[k] = records[k]
                    continue
                info = _write_shard(k, tuple(shard["rows"]), plan, categories, Path(tmp), opts.block_cells, bar,
                                    kill_counter)
                folder = Path(tmp) / info["name"]
                for rel in info["files"]:
                    loc.write(f"{info['name']}/{rel}", (folder / rel).read_bytes())
                loc.write(f"{BUILDING}/{info['name']}.json", json_bytes({"build_id": build_id, "shard": info}))
                shutil.rmtree(folder)
                manifest.shards[k] = info
        _finish(manifest, inputs)
        loc.write("vocab.json", json_bytes(vocab.as_dict()))
        loc.write(MANIFEST_NAME, json_bytes(manifest.data))  # last: from here on the dataset exists
        for key in loc.keys(BUILDING):
            loc.delete(key)
        return manifest.data
    finally:
        for i in plan:
            i.source.close()


def format_summary(manifest: dict[str, Any], output: str | Path) -> str:
    """The human-readable end-of-build report."""
    lines = [f"dataset {output}: {manifest['n_cells']:,} cells, {manifest['n_nonzero']:,} non-zero values "
             f"in {len(manifest['shards'])} shard(s)"]
    for s in manifest["sources"]:
        lines.append(f"  {s['path']} [{s['field']}]: {s['n_obs']:,} cells; genes in vocabulary "
                     f"{s['genes_matched']:,} / {s['n_vars']:,} (unmatched {s['genes_unmatched']:,}"
                     + (f", mapped by table {s['genes_mapped_by_table']:,}" if manifest["build"]["gene_map"] else "")
                     + (f", merged {s['genes_merged']:,}" if s["genes_merged"] else "") + ")")
    mc = manifest["modality_counts"]
    lines.append(f"  modality: scRNA-seq {mc['scrna']:,}, spatial {mc['spatial']:,}")
    d = manifest["cells_dropped"]
    lines.append(f"  cells dropped: {d['no_counts'] + d['no_vocab_genes']:,} "
                 f"(no counts {d['no_counts']:,}; counts only in genes outside the vocabulary {d['no_vocab_genes']:,})")
    for col, cats in manifest["obs_columns"].items():
        lines.append(f"  obs[{col!r}]: {len(cats)} categories")
    return "\n".join(lines)
