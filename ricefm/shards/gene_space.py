"""From a file's genes and cells to vocabulary space: gene mapping, overlap check, modality codes.

Shared by ``build-data`` and ``embed``, so both tokenize a cell the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ricefm.errors import RiceFMInputError
from ricefm.shards.sources import H5adSource
from ricefm.vocab import GeneVocab

_MODALITY_WORDS = {"scrna": 0, "scrna-seq": 0, "scrnaseq": 0, "sc": 0, "0": 0,
                   "spatial": 1, "st": 1, "1": 1}


def modality_codes(src: H5adSource, modality: str) -> np.ndarray:
    """int8 per cell: ``scrna`` / ``spatial`` for all cells, or ``obs:COLUMN`` per cell."""
    if modality in ("scrna", "spatial"):
        return np.full(src.n_obs, _MODALITY_WORDS[modality], dtype=np.int8)
    if not modality.startswith("obs:"):
        raise RiceFMInputError(f"--modality {modality!r}: use scrna, spatial or obs:COLUMN")
    col = src.obs_column(modality[4:], "--modality")
    codes = col.astype(str).str.strip().str.lower().map(_MODALITY_WORDS)
    if codes.isna().any():
        bad = sorted(set(col[codes.isna()].astype(str)))[:5]
        raise RiceFMInputError(
            f"{src.path}: obs[{modality[4:]!r}] (--modality) has values {bad} that are neither scRNA-seq "
            "(scrna/sc/0) nor spatial (spatial/st/1)")
    return codes.to_numpy(dtype=np.int8)


def translated_genes(src: H5adSource, gene_map: dict[str, str] | None) -> tuple[list[str], int]:
    """The file's gene ids after an optional translation table, and how many the table changed."""
    if gene_map is None:
        return src.genes, 0
    return [gene_map.get(g, g) for g in src.genes], sum(1 for g in src.genes if g in gene_map)


@dataclass
class VocabMapping:
    """Input column -> vocabulary id (-1 = not in the vocabulary) for one file."""

    vocab_ids: np.ndarray
    vocab_size: int
    collapses: bool  # several columns map to one vocabulary gene; their counts are summed
    stats: dict

    @classmethod
    def build(cls, src: H5adSource, genes: list[str], vocab: GeneVocab, min_fraction: float,
              gene_column: str | None, gene_map_name: str | None, n_by_table: int) -> "VocabMapping":
        ids = vocab.lookup(genes)
        matched = ids >= 0
        frac = matched.mean() if len(ids) else 0.0
        if frac < min_fraction:
            rap_like = any(g[:2] == "Os" and "g" in g for g in src.genes[:50]) and not gene_map_name
            hint = " (RAP-DB ids? add --gene-map rap-to-msu)" if rap_like else ""
            raise RiceFMInputError(
                f"{src.path}: only {matched.sum()} of {len(ids)} genes ({frac:.1%}) of {gene_column or 'var_names'} "
                f"are in the vocabulary {vocab.source}, below --min-gene-fraction {min_fraction:g}{hint}; "
                "use a matching --vocab or --build-vocab")
        kept = ids[matched]
        merged = int(len(kept) - len(np.unique(kept)))
        stats = {"genes_matched": int(matched.sum()), "genes_unmatched": int((~matched).sum()),
                 "genes_mapped_by_table": n_by_table, "genes_merged": merged}
        return cls(ids, len(vocab), merged > 0, stats)

    def apply(self, block: sp.csr_matrix) -> sp.csr_matrix:
        """Keep in-vocabulary columns, relabelled with vocabulary ids, in input column order."""
        ids = self.vocab_ids[block.indices]
        keep = ids >= 0
        indptr = np.concatenate([[0], np.cumsum(keep)])[block.indptr]
        out = sp.csr_matrix((block.data[keep], ids[keep].astype(np.int32), indptr), shape=(block.shape[0], self.vocab_size))
        if self.collapses:
            out.sum_duplicates()
        return out
