"""Per-cell quantile binning, bit-identical to the published riceFM code.

For a cell's non-zero values v: ``edges = np.quantile(v, np.linspace(0, 1, N_EDGES))`` and
``bin = np.digitize(value, edges)``, i.e. the number of edges <= value (1..50; zeros are 0). Ties
push a value to the highest matching bin. :func:`bin_cells` does the same for thousands of cells
at once (one sort + one searchsorted) because a per-cell ``np.quantile`` call would cap the
shard builder at a few thousand cells per second.
"""

from __future__ import annotations

import numpy as np

N_BINS = 51
N_EDGES = N_BINS - 1
_QUANTILES = np.linspace(0, 1, N_EDGES)


def bin_cell(values: np.ndarray) -> np.ndarray:
    """Bins of one cell's non-zero values (reference implementation, one cell at a time)."""
    values = np.asarray(values)
    if values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    edges = np.quantile(values, _QUANTILES)
    return np.digitize(values, edges).astype(np.uint8)


def bin_dense_row(row: np.ndarray) -> np.ndarray:
    """Bins of a dense row including zeros: zeros -> 0, non-zeros binned among themselves."""
    row = np.asarray(row)
    out = np.zeros(row.shape, dtype=np.uint8)
    nz = row > 0
    out[nz] = bin_cell(row[nz])
    return out


def quantile_edges(indptr: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """(n_cells, 50) float64 edges from values sorted within each CSR row.

    Reproduces ``np.quantile(..., method="linear")`` operation for operation (virtual index
    ``(n-1)*q``, neighbours clipped to the row, numpy's two-sided lerp), so edges are bitwise
    equal to numpy's.
    """
    counts = np.diff(indptr).astype(np.int64)
    n = counts[:, None]
    virtual = (n - 1) * _QUANTILES[None, :]
    prev = np.floor(virtual)
    above = virtual >= n - 1
    gamma = virtual - np.where(above, -1.0, prev)
    prev_i = np.where(above, n - 1, prev.astype(np.int64))
    next_i = np.where(above, n - 1, prev_i + 1)
    base = indptr[:-1, None].astype(np.int64)
    a = sorted_values[base + prev_i]
    b = sorted_values[base + next_i]
    diff = b - a
    lerp = a + diff * gamma
    hi = gamma >= 0.5
    lerp[hi] = (b - diff * (1 - gamma))[hi]
    return lerp


def _float32_ceil(x: np.ndarray) -> np.ndarray:
    """Smallest float32 >= x, so that for float32 v: ``x <= v`` iff ``ceil32(x) <= v``."""
    f = x.astype(np.float32)
    low = f.astype(np.float64) < x
    f[low] = np.nextafter(f[low], np.float32(np.inf))
    return f


def bin_cells(indptr: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bins (uint8, same order as ``values``) of many cells given in CSR layout.

    ``values`` must be positive float32 (the stored non-zeros). Equal to calling
    :func:`bin_cell` on every row, about 3x faster than that loop.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    counts = np.diff(np.asarray(indptr, dtype=np.int64))
    if values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    counts = counts[counts > 0]  # empty rows own no values and need no edges
    n_cells = len(counts)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    # Positive float32 bit patterns sort like the floats; prefixing the row index sorts by row
    # first, so one flat int64 sort orders every row at once.
    row = np.repeat(np.arange(n_cells, dtype=np.int64), counts)
    keys = (row << 32) | values.view(np.int32).astype(np.int64)
    order = np.argsort(keys)
    sorted_keys = keys[order]
    sorted_values = (sorted_keys & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    edges = quantile_edges(indptr, sorted_values)
    edge_keys = (np.arange(n_cells, dtype=np.int64)[:, None] << 32) | _float32_ceil(edges).view(np.int32)
    # Edge j of a row is <= every sorted value from position first_ge[j] on; it never passes the
    # row's end because the last edge is the row maximum.
    first_ge = np.searchsorted(sorted_keys, edge_keys.ravel(), side="left")
    edges_le = np.cumsum(np.bincount(first_ge, minlength=len(sorted_keys)))[: len(sorted_keys)]
    sorted_bins = edges_le - np.repeat(np.arange(n_cells, dtype=np.int64) * N_EDGES, counts)
    bins = np.empty(len(values), dtype=np.uint8)
    bins[order] = sorted_bins
    return bins
