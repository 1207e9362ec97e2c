"""Cells held in memory as vocabulary-mapped CSR rows with their per-cell bins, cut into
perceptual-only batches on request: what embedding and annotation fine-tuning feed a backend.

Tokenization is exactly the training one (``bin_cells`` over all of a cell's non-zero
in-vocabulary genes, ``<cls>`` first with value pad_value), so a cell gets the same tokens
whether it comes from shards or straight from an h5ad.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ricefm.batching import TokenSpec, collate_pcpt
from ricefm.binning import bin_cells
from ricefm.shards.reader import CellBatch


@dataclass
class TokenizedCells:
    indptr: np.ndarray
    gene_ids: np.ndarray
    values: np.ndarray
    bins: np.ndarray
    modality: np.ndarray
    index_offset: int = 0  # global index of row 0 (for ``cell_index`` in batches)

    @classmethod
    def from_mapped(cls, mapped: sp.csr_matrix, modality: np.ndarray, index_offset: int = 0) -> "TokenizedCells":
        """``mapped``: rows of cells, columns = vocabulary ids (``VocabMapping.apply``)."""
        return cls(mapped.indptr.astype(np.int64), mapped.indices.astype(np.int32), mapped.data,
                   bin_cells(mapped.indptr, mapped.data), np.asarray(modality), index_offset)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def cells(self, rows: np.ndarray) -> CellBatch:
        rows = np.asarray(rows, np.int64)
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        take = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(rows) else np.zeros(0, np.int64)
        return CellBatch(indices=rows + self.index_offset, lengths=(ends - starts).astype(np.int64),
                         modality=self.modality[rows],
                         arrays={"gene_ids": self.gene_ids[take], "values": self.values[take], "bins": self.bins[take]})

    def batch(self, rows: np.ndarray, tokens: TokenSpec, max_seq_len: int, selection: str = "highest",
              length_multiple: int = 1) -> dict[str, np.ndarray]:
        """A pcpt-only batch of ``rows``; ``length_multiple`` > 1 pads the length up to a multiple
        of it (at most max_seq_len), so a compiled backend sees few distinct shapes."""
        batch = collate_pcpt(self.cells(rows), tokens, max_seq_len, selection=selection)
        L = batch["gene_ids"].shape[1]
        target = min(max_seq_len, -(-L // length_multiple) * length_multiple)
        if target > L:
            extra = target - L
            batch["gene_ids"] = np.pad(batch["gene_ids"], ((0, 0), (0, extra)), constant_values=tokens.pad_id)
            batch["values"] = np.pad(batch["values"], ((0, 0), (0, extra)), constant_values=tokens.pad_value)
            batch["key_padding_mask"] = batch["gene_ids"] == tokens.pad_id
        return batch
