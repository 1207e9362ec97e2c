"""riceFM backend-neutral core: vocabulary, binning, data shards, batching (NumPy only)."""

__version__ = "0.1.0"
