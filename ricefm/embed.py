"""Cell embeddings for an h5ad file with any backend: ``ricefm embed``.

Cells are tokenized exactly as in training (per-cell binning of the non-zero in-vocabulary genes,
``<cls>`` first with value pad_value), cut to ``<cls>`` + the 3,000 highest-count genes by default
(the published inference protocol), and run through the pcpt-only forward; the ``<cls>`` output
goes to ``obsm["X_ricefm"]`` and the run parameters to ``uns["ricefm"]``. The input is read in row
blocks and the output is the input file plus those two entries, written via a temporary file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import anndata as ad
import h5py
import numpy as np
from tqdm.auto import tqdm

from ricefm.atomic import atomic_file
from ricefm.backends import Embedder, get_backend
from ricefm.batching import TokenSpec
from ricefm.cells import TokenizedCells
from ricefm.errors import RiceFMInputError
from ricefm.gene_maps import load_gene_map
from ricefm.shards.gene_space import VocabMapping, modality_codes, translated_genes
from ricefm.shards.sources import H5adSource

OBSM_KEY = "X_ricefm"
BLOCK_CELLS = 4096
LENGTH_MULTIPLE = 32  # batch lengths rounded up: a compiled (XLA) backend sees few shapes
# The published inference protocol (riceFM's and scGPT's tutorials): <cls> + up to 3,000 of a cell's
# non-zero genes, whatever length the model was trained at (it has no positional encoding).
INFERENCE_MAX_SEQ_LEN = 3001


def check_embed_settings(batch_size: int, max_seq_len: int | None) -> None:
    """Lengths and batch sizes that cannot embed stop here, before any model is loaded."""
    if int(batch_size) < 1:
        raise RiceFMInputError(f"--batch-size {batch_size}: must be at least 1")
    if max_seq_len is not None and int(max_seq_len) < 2:
        raise RiceFMInputError(f"--max-seq-len {max_seq_len}: must be at least 2 (<cls> and one gene)")


def check_output_file(input_path: str | Path, output_path: str | Path) -> None:
    """An output .h5ad that can be written and is not the input (checked before any work)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise RiceFMInputError(f"--input {input_path}: input file not found")
    if output_path.resolve() == input_path.resolve():
        raise RiceFMInputError(f"--output {output_path}: must differ from --input")
    if output_path.is_dir():
        raise RiceFMInputError(f"--output {output_path}: is a folder; name the .h5ad file to write")
    parent = output_path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise RiceFMInputError(f"--output {output_path}: {parent} is not writable; choose another location")


def load_embedder(backend: str, checkpoint: str | Path, device: str = "auto") -> Embedder:
    """The named backend's embedder for ``checkpoint`` on ``device`` (through ``ricefm.backends``)."""
    return get_backend(backend).load_embedder(checkpoint, device=device)


def embed_cells(embedder: Embedder, src: H5adSource, mapping: VocabMapping, modality: np.ndarray,
                batch_size: int, max_seq_len: int, selection: str, progress: bool = True) -> tuple[np.ndarray, int]:
    """(n_obs, d_model) float32 embeddings of every cell of ``src``, and how many cells had no
    in-vocabulary gene (they are embedded from ``<cls>`` alone)."""
    out = np.zeros((src.n_obs, int(embedder.model_config.d_model)), np.float32)
    empty = 0
    with tqdm(total=src.n_obs, unit="cell", desc="embed", disable=not progress) as bar:
        for lo in range(0, src.n_obs, BLOCK_CELLS):
            hi = min(lo + BLOCK_CELLS, src.n_obs)
            cells = TokenizedCells.from_mapped(mapping.apply(src.read_rows(lo, hi)), modality[lo:hi], index_offset=lo)
            empty += int((cells.lengths == 0).sum())
            out[lo:hi] = embed_tokenized(embedder, cells, batch_size, max_seq_len, selection, bar.update)
    return out, empty


def embed_tokenized(embedder: Embedder, cells: TokenizedCells, batch_size: int, max_seq_len: int, selection: str,
                    on_batch: Callable[[int], Any] | None = None) -> np.ndarray:
    """Embeddings of cells already in memory, in their order, ``batch_size`` at a time.

    Batches are cut from the cells sorted by length (the same length-aware batching as training),
    so a batch pads to a length close to all of its cells; results go back to the cells' order.
    """
    tokens = TokenSpec(embedder.vocab.pad_id, embedder.vocab.cls_id, float(embedder.model_config.pad_value))
    out = np.zeros((len(cells), int(embedder.model_config.d_model)), np.float32)
    by_length = np.argsort(np.minimum(cells.lengths, max_seq_len - 1), kind="stable")
    for s in range(0, len(cells), batch_size):
        rows = by_length[s:s + batch_size]
        out[rows] = embedder.embed(cells.batch(rows, tokens, max_seq_len, selection, LENGTH_MULTIPLE))
        if on_batch is not None:
            on_batch(len(rows))
    return out


def write_h5ad_additions(input_path: Path, output_path: Path, add: Callable[[h5py.File], None]) -> None:
    """A copy of the input file changed by ``add(h5py file)`` (new obs/obsm/uns entries), written
    under a temporary name beside ``output_path`` and renamed over it when complete."""
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output_path, ".h5ad") as tmp:
        shutil.copyfile(input_path, tmp)
        with h5py.File(tmp, "a") as f:
            for group in ("obsm", "uns"):
                if group not in f:
                    ad.io.write_elem(f, group, {})
            add(f)


def write_embeddings(input_path: Path, output_path: Path, emb: np.ndarray, info: dict[str, Any]) -> None:
    """The input file plus obsm[X_ricefm] and uns[ricefm], swapped into place when complete."""

    def add(f: h5py.File) -> None:
        for group, key, value in (("obsm", OBSM_KEY, emb), ("uns", "ricefm", info)):
            if key in f[group]:
                del f[group][key]
            ad.io.write_elem(f[group], key, value)

    write_h5ad_additions(input_path, output_path, add)


def embed_h5ad(input_path: str | Path, output_path: str | Path, embedder: Embedder, batch_size: int = 64,
               max_seq_len: int | None = None, selection: str = "highest", layer: str | None = None,
               gene_column: str | None = None, gene_map: str | None = None, modality: str = "scrna",
               min_gene_fraction: float = 0.1, progress: bool = True) -> dict[str, Any]:
    input_path, output_path = Path(input_path), Path(output_path)
    check_embed_settings(batch_size, max_seq_len)
    check_output_file(input_path, output_path)
    max_seq_len = int(max_seq_len or INFERENCE_MAX_SEQ_LEN)
    src = H5adSource.open(input_path, layer=layer, gene_column=gene_column)
    try:
        genes, n_by_table = translated_genes(src, load_gene_map(gene_map) if gene_map else None)
        mapping = VocabMapping.build(src, genes, embedder.vocab, min_gene_fraction, gene_column, gene_map, n_by_table)
        codes = modality_codes(src, modality)
        emb, empty = embed_cells(embedder, src, mapping, codes, batch_size, max_seq_len, selection, progress)
    finally:
        src.close()
    info = {"backend": embedder.description, "checkpoint_vocab_sha256": embedder.vocab.sha256(),
            "max_seq_len": max_seq_len, "selection": selection, "batch_size": batch_size, "field": src.field,
            "cells": src.n_obs, "cells_without_vocab_genes": empty, **mapping.stats}
    write_embeddings(input_path, output_path, emb, info)
    return info
