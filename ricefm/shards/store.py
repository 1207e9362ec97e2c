"""TensorStore zarr-v3 specs for shard arrays, and the zarr group that holds one shard.

Per-non-zero arrays (``gene_ids``, ``values``, ``bins``) use zarr's sharding codec: 4,096-element
inner chunks (a random cell decodes little beyond itself) packed into 1 Mi-element shard files
(few files, whole-file writes). Per-cell arrays are small and use plain chunks.

Every chunk ends in a CRC32C (zarr's ``crc32c`` codec) that TensorStore checks on each decode,
every chunk is stored (even one equal to the fill value), and readers open arrays with
``fill_missing_data_reads`` off: a damaged chunk or a missing one is an error at the read that
meets it, never zeros.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

INNER_CHUNK = 4096
OUTER_CHUNK = 1 << 20
CELL_CHUNK = 65536

NONZERO_ARRAYS = {"gene_ids": np.int32, "values": np.float32, "bins": np.uint8}
CELL_ARRAYS = {"offsets": np.int64, "modality": np.int8, "source_file": np.int32, "source_row": np.int64}
OBS_DTYPE = np.int32

_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}, "data_copy_concurrency": {"limit": 2}})


def _compressor(dtype: np.dtype) -> dict[str, Any]:
    return {
        "name": "blosc",
        "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle" if dtype.itemsize > 1 else "noshuffle",
                          "typesize": dtype.itemsize, "blocksize": 0},
    }


def _metadata(dtype: np.dtype, per_nonzero: bool, attributes: dict | None) -> dict[str, Any]:
    dtype = np.dtype(dtype)
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}, _compressor(dtype), {"name": "crc32c"}]
    if per_nonzero:
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [INNER_CHUNK], "codecs": inner,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}]
        chunk = OUTER_CHUNK
    else:
        codecs, chunk = inner, CELL_CHUNK
    meta = {"shape": [0], "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk]}},
            "chunk_key_encoding": {"name": "default"}, "data_type": dtype.name, "fill_value": 0, "codecs": codecs}
    if attributes:
        meta["attributes"] = attributes
    return meta


def create_array(path: Path, dtype, per_nonzero: bool, attributes: dict | None = None) -> ts.TensorStore:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": _metadata(dtype, per_nonzero, attributes), "create": True, "delete_existing": True,
            "store_data_equal_to_fill_value": True}
    return ts.open(spec, context=_CONTEXT).result()


def open_array(path: Path | dict[str, Any]) -> ts.TensorStore:
    """A shard array for reading: ``path`` is a local folder or a TensorStore kvstore spec
    (``ricefm.storage.Location.kvstore``: a folder, an S3 or a GCS prefix)."""
    kvstore = path if isinstance(path, dict) else {"driver": "file", "path": str(path)}
    spec = {"driver": "zarr3", "kvstore": kvstore, "open": True,
            "recheck_cached_data": False, "recheck_cached_metadata": False, "fill_missing_data_reads": False}
    return ts.open(spec, context=_CONTEXT, read=True).result()


def append(arr: ts.TensorStore, data: np.ndarray) -> ts.TensorStore:
    """Grow a 1-D array by ``len(data)`` and write ``data`` at its end."""
    start = arr.domain.exclusive_max[0]
    arr = arr.resize(exclusive_max=[start + len(data)]).result()
    arr[start:start + len(data)].write(data).result()
    return arr


def write_group(path: Path, attributes: dict[str, Any]) -> None:
    """A zarr-v3 group node, so zarr-python and other readers see the shard as one group."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "zarr.json", "w") as f:
        json.dump({"zarr_format": 3, "node_type": "group", "attributes": attributes}, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
