"""Read one ``.h5ad`` file in row blocks without loading its matrix, with clear input checks.

h5py + anndata's element readers are used instead of ``read_h5ad(backed="r")`` because backed
mode loads every layer into memory; here only ``obs``/``var`` are read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ricefm.errors import RiceFMInputError


@dataclass
class H5adSource:
    """An open h5ad file: gene ids, obs table and a row-block reader for one matrix field."""

    path: Path
    field: str
    genes: list[str]
    obs: pd.DataFrame
    n_obs: int
    n_vars: int
    encoding: str
    _file: h5py.File
    _matrix: object

    @classmethod
    def open(cls, path: str | Path, layer: str | None = None, gene_column: str | None = None) -> "H5adSource":
        path = Path(path)
        if not path.is_file():
            raise RiceFMInputError(f"{path}: input file not found")
        if not h5py.is_hdf5(path):
            raise RiceFMInputError(f"{path}: not an h5ad file (not HDF5); write it with AnnData.write_h5ad")
        f = h5py.File(path, "r")
        try:
            if "obs" not in f or "var" not in f or "X" not in f and layer is None:
                raise RiceFMInputError(f"{path}: not an h5ad file (no obs/var/X groups); write it with AnnData.write_h5ad")
            field = "X" if layer is None else f"layers/{layer}"
            if field not in f:
                have = sorted(f["layers"].keys()) if "layers" in f else []
                raise RiceFMInputError(f"{path}: field {field} not found; layers present: {have or 'none'}")
            obs = ad.io.read_elem(f["obs"])
            var = ad.io.read_elem(f["var"])
            if gene_column is None:
                genes = var.index.astype(str).tolist()
            elif gene_column not in var.columns:
                raise RiceFMInputError(
                    f"{path}: var has no column {gene_column!r} (--gene-column); columns: {list(var.columns) or 'none'}; "
                    "omit --gene-column to use var_names")
            else:
                genes = var[gene_column].astype(str).tolist()
            node = f[field]
            if isinstance(node, h5py.Group):
                encoding = node.attrs.get("encoding-type", "")
                if encoding not in ("csr_matrix", "csc_matrix"):
                    raise RiceFMInputError(f"{path}: {field} has unsupported encoding {encoding!r}; expected CSR, CSC or dense")
                matrix = ad.io.sparse_dataset(node)
                shape = tuple(matrix.shape)
            else:
                encoding, matrix, shape = "dense", node, tuple(node.shape)
            if shape != (len(obs), len(var)):
                raise RiceFMInputError(f"{path}: {field} shape {shape} does not match obs x var ({len(obs)}, {len(var)})")
            dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
            if len(dup):
                col = gene_column or "var_names"
                raise RiceFMInputError(
                    f"{path}: {len(dup)} duplicate gene id(s) in {col}, e.g. {', '.join(map(str, dup[:5]))}; "
                    "make them unique (sum or drop duplicated genes) before building")
        except BaseException:
            f.close()
            raise
        return cls(path, field, genes, obs, shape[0], shape[1], encoding, f, matrix)

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` as float32 CSR, after checking the values are counts-like."""
        block = self._matrix[start:stop]
        block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
        block.sum_duplicates()
        data = block.data
        if data.dtype != np.float32:
            data = data.astype(np.float32)
            block = sp.csr_matrix((data, block.indices, block.indptr), shape=block.shape)
        bad = ~np.isfinite(data) | (data < 0)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            row = start + int(np.searchsorted(block.indptr, k, side="right") - 1)
            v = data[k]
            kind = "NaN" if np.isnan(v) else "infinite" if np.isinf(v) else "negative"
            raise RiceFMInputError(
                f"{self.path}: {self.field} holds {int(bad.sum())} {kind}-or-invalid value(s), first {v!r} at cell "
                f"{row} ({self.obs.index[row]!r}), gene {self.genes[block.indices[k]]!r}; riceFM needs raw counts "
                "(non-negative, finite): pass --layer with the raw-count layer")
        return block

    def obs_column(self, column: str, flag: str) -> pd.Series:
        if column not in self.obs.columns:
            raise RiceFMInputError(
                f"{self.path}: obs has no column {column!r} ({flag}); columns: {list(self.obs.columns) or 'none'}")
        return self.obs[column]

    def close(self) -> None:
        self._file.close()
