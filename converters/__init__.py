"""Checkpoint converters between the published riceFM format, torch safetensors and Flax/orbax."""
