"""Read one ``.h5ad`` file in row blocks without loading its matrix, with clear input checks.

h5py + anndata's element readers are used instead of ``read_h5ad(backed="r")`` because backed
mode loads every layer into memory; here only ``obs``/``var`` are read whole. CSR is sliced
directly, dense in bounded sub-blocks, and CSC through a memory-mapped CSR copy.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ricefm.errors import RiceFMInputError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


COUNTS_SAMPLE_BLOCKS, COUNTS_SAMPLE_ROWS = 4, 256  # the raw-count check reads at most 1,024 cells a file


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
    require_integers: bool = False  # refuse non-integer values (normalized / log data) in read_rows

    @classmethod
    def open(cls, path: str | Path, layer: str | None = None, gene_column: str | None = None) -> "H5adSource":
        path = Path(path)
        if not path.is_file():
            raise RiceFMInputError(f"{path}: input file not found")
        if not h5py.is_hdf5(path):
            raise RiceFMInputError(f"{path}: not an h5ad file (not HDF5); write it with AnnData.write_h5ad")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise RiceFMInputError(f"{path}: unreadable h5ad ({_first_line(e)}); the file is truncated or damaged: "
                                   "copy or write it again") from None
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
                shape = tuple(int(x) for x in node.attrs["shape"])
                matrix = ad.io.sparse_dataset(node) if encoding == "csr_matrix" else _CscByRows(node, shape)
            else:
                encoding, matrix, shape = "dense", node, tuple(node.shape)
            if shape != (len(obs), len(var)):
                raise RiceFMInputError(f"{path}: {field} shape {shape} does not match obs x var ({len(obs)}, {len(var)})")
            if 0 in shape:
                raise RiceFMInputError(f"{path}: {field} has {shape[0]} cells x {shape[1]} genes; nothing to read")
            dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
            if len(dup):
                col = gene_column or "var_names"
                raise RiceFMInputError(
                    f"{path}: {len(dup)} duplicate gene id(s) in {col}, e.g. {', '.join(map(str, dup[:5]))}; "
                    "make them unique (sum or drop duplicated genes) before building")
        except OSError as e:  # h5py: a truncated or damaged file (its superblock was readable)
            f.close()
            raise RiceFMInputError(f"{path}: unreadable h5ad ({_first_line(e)}); the file is truncated or damaged: "
                                   "copy or write it again") from None
        except BaseException:
            f.close()
            raise
        return cls(path, field, genes, obs, shape[0], shape[1], encoding, f, matrix)

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` as float32 CSR, after checking the values are counts-like."""
        try:
            return self._read_rows(start, stop)
        except OSError as e:
            raise RiceFMInputError(f"{self.path}: {self.field} rows {start}..{stop} unreadable ({_first_line(e)}); "
                                   "the file is truncated or damaged: copy or write it again") from None

    def _read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        if self.encoding == "dense":  # at most ~16M dense values in memory at a time
            step = max(1, DENSE_BLOCK_VALUES // max(1, self.n_vars))
            block = sp.vstack([sp.csr_matrix(self._matrix[r:min(r + step, stop)]) for r in range(start, stop, step)],
                              format="csr")
        else:
            block = self._matrix[start:stop].tocsr()
        block.sum_duplicates()
        data = block.data
        if data.dtype != np.float32:
            data = data.astype(np.float32)
            block = sp.csr_matrix((data, block.indices, block.indptr), shape=block.shape)
        bad = ~np.isfinite(data) | (data < 0)
        if self.require_integers and not bad.any():
            self._count_non_integers(block, start, refuse=True)
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

    def _count_non_integers(self, block: sp.csr_matrix, start: int, refuse: bool) -> int:
        """Non-integer values among the block's non-zeros (rows from ``start``); with ``refuse``, the
        first one is an error naming its cell and gene and the fixes."""
        fractional = block.data != np.floor(block.data)
        if refuse and fractional.any():
            k = int(np.flatnonzero(fractional)[0])
            row = start + int(np.searchsorted(block.indptr, k, side="right") - 1)
            layers = sorted(self._file["layers"].keys()) if "layers" in self._file else []
            raise RiceFMInputError(
                f"{self.path}: {self.field} holds non-integer values, e.g. {float(block.data[k]):g} at cell {row} "
                f"({self.obs.index[row]!r}), gene {self.genes[int(block.indices[k])]!r}: it looks normalized or "
                f"log-transformed, and riceFM is pretrained on raw counts; pass --layer with the raw counts (layers "
                f"here: {', '.join(layers) or 'none'}), or --allow-non-counts to build from these values knowingly")
        return int(fractional.sum())

    def check_counts(self, sample_blocks: int = COUNTS_SAMPLE_BLOCKS, block_rows: int = COUNTS_SAMPLE_ROWS
                     ) -> dict[str, int]:
        """Read ``sample_blocks`` evenly spaced blocks of ``block_rows`` cells (at most 1,024 cells by
        default, whatever the file's size) and count the non-integer values among their non-zeros;
        refuses them when ``require_integers``. The build then checks every block it writes."""
        starts = sorted({int(x) for x in np.linspace(0, max(self.n_obs - block_rows, 0), sample_blocks)})
        rows = values = non_integer = 0
        require, self.require_integers = self.require_integers, False
        try:
            hi = 0
            for lo in starts:
                lo, hi = max(lo, hi), min(lo + block_rows, self.n_obs)  # small files: blocks do not overlap
                if lo >= hi:
                    continue
                block = self.read_rows(lo, hi)
                non_integer += self._count_non_integers(block, lo, refuse=require)
                rows, values = rows + hi - lo, values + block.nnz
        finally:
            self.require_integers = require
        return {"cells_sampled": rows, "values_sampled": values, "non_integer_sampled": non_integer}

    def obs_column(self, column: str, flag: str) -> pd.Series:
        if column not in self.obs.columns:
            raise RiceFMInputError(
                f"{self.path}: obs has no column {column!r} ({flag}); columns: {list(self.obs.columns) or 'none'}")
        return self.obs[column]

    def close(self) -> None:
        if isinstance(self._matrix, _CscByRows):
            self._matrix.close()
        self._file.close()


DENSE_BLOCK_VALUES = 1 << 24
CSC_PASS_NONZEROS = 1 << 24


class _CscByRows:
    """Row-block access to an on-disk CSC matrix.

    Slicing rows of a CSC matrix touches every column, and anndata answers it by loading the
    whole matrix. Instead, two streaming passes over the columns write a CSR copy into
    memory-mapped scratch files (columns stay in order within each row); rows are then sliced
    from those. Memory use is bounded by ``CSC_PASS_NONZEROS`` entries plus the row pointers.
    """

    def __init__(self, group: h5py.Group, shape: tuple[int, int]):
        self.shape = shape
        self._group = group
        self._scratch: tempfile.TemporaryDirectory | None = None

    def _transpose(self) -> None:
        n_obs, n_vars = self.shape
        col_ptr = self._group["indptr"][:].astype(np.int64)
        indices, data = self._group["indices"], self._group["data"]
        nnz = int(col_ptr[-1])
        row_counts = np.zeros(n_obs, np.int64)
        for s in range(0, nnz, CSC_PASS_NONZEROS):
            row_counts += np.bincount(indices[s:s + CSC_PASS_NONZEROS], minlength=n_obs)
        self.row_ptr = np.concatenate([[0], np.cumsum(row_counts)])
        self._scratch = tempfile.TemporaryDirectory(prefix="ricefm-csc-")
        self.cols = np.memmap(Path(self._scratch.name) / "cols", np.int32, "w+", shape=(max(nnz, 1),))
        self.vals = np.memmap(Path(self._scratch.name) / "vals", data.dtype, "w+", shape=(max(nnz, 1),))
        fill = self.row_ptr[:-1].copy()
        c = 0
        while c < n_vars:
            c_end = int(np.searchsorted(col_ptr, col_ptr[c] + CSC_PASS_NONZEROS, side="right") - 1)
            c_end = min(max(c_end, c + 1), n_vars)
            s, e = int(col_ptr[c]), int(col_ptr[c_end])
            rows = indices[s:e]
            order = np.argsort(rows, kind="stable")  # stable: columns stay ascending within a row
            rows = rows[order]
            uniq, first, counts = np.unique(rows, return_index=True, return_counts=True)
            pos = fill[rows] + np.arange(len(rows)) - np.repeat(first, counts)
            self.cols[pos] = np.repeat(np.arange(c, c_end, dtype=np.int32), np.diff(col_ptr[c:c_end + 1]))[order]
            self.vals[pos] = data[s:e][order]
            fill[uniq] += counts
            c = c_end

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        if self._scratch is None:
            self._transpose()
        ptr = self.row_ptr[rows.start:rows.stop + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        return sp.csr_matrix((np.array(self.vals[lo:hi]), np.array(self.cols[lo:hi]), ptr - lo),
                             shape=(len(ptr) - 1, self.shape[1]))

    def close(self) -> None:
        if self._scratch is not None:
            del self.cols, self.vals
            self._scratch.cleanup()
            self._scratch = None
