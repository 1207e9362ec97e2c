"""AnnData -> TensorStore cell shards (build), manifest, and a random-access reader."""

from ricefm.shards.manifest import FORMAT_VERSION, Manifest, load_manifest
from ricefm.shards.reader import CellBatch, ShardedCells

__all__ = ["FORMAT_VERSION", "Manifest", "load_manifest", "CellBatch", "ShardedCells"]
