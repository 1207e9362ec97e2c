"""The one table between the published/torch state-dict names and the Flax NNX parameter paths.

Both module trees have the same attribute names, so a Flax path maps to a torch key by joining
it with dots and renaming its leaf; only Linear kernels are transposed ((in, out) in Flax,
(out, in) in torch). Every conversion is therefore exact.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ricefm.errors import RiceFMInputError

# Flax leaf -> torch leaf; "kernel" is the only one stored transposed
LEAF_TO_TORCH = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def torch_key(flax_path: tuple) -> str:
    *parents, leaf = flax_path
    return ".".join(str(p) for p in parents) + "." + LEAF_TO_TORCH[leaf]


def to_torch_layout(flax_path: tuple, value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T) if flax_path[-1] == "kernel" else value


def to_flax_layout(flax_path: tuple, value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T) if flax_path[-1] == "kernel" else value


def check_keys(expected: Mapping[str, tuple], state: Mapping[str, np.ndarray], source: str) -> None:
    """One error listing every missing, unknown and mis-shaped key (torch names, torch layout)."""
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in sorted(set(expected) & set(state))
              if tuple(state[k].shape) != tuple(expected[k])]
    problems = ([f"missing: {', '.join(missing)}"] if missing else []) + (
        [f"unknown: {', '.join(unknown)}"] if unknown else []) + ([f"mis-shaped: {'; '.join(shapes)}"] if shapes else [])
    if problems:
        raise RiceFMInputError(f"{source}: checkpoint does not fit the model ({' | '.join(problems)})")


# torch modules whose "weight" is an embedding table, and names of LayerNorm modules
EMBEDDING_MODULES = frozenset({"encoder.embedding", "flag_encoder", "mod_encoder.embedding"})
NORM_NAMES = frozenset({"enc_norm", "norm", "norm1", "norm2"})


def _is_cls_decoder_norm(parts: tuple) -> bool:
    """``cls_decoder._decoder`` repeats (Linear, ReLU, LayerNorm): every third entry is a norm."""
    return len(parts) >= 3 and parts[-3:-1] == ("cls_decoder", "_decoder") and parts[-1] % 3 == 2


def flax_path(key: str) -> tuple:
    """Inverse of :func:`torch_key`: ``transformer_encoder.layers.0.norm1.weight`` ->
    ``('transformer_encoder', 'layers', 0, 'norm1', 'scale')``."""
    parent, leaf = key.rsplit(".", 1)
    parts = tuple(int(p) if p.isdigit() else p for p in parent.split("."))
    if leaf == "bias":
        return (*parts, "bias")
    if parent in EMBEDDING_MODULES:
        return (*parts, "embedding")
    if parts[-1] in NORM_NAMES or _is_cls_decoder_norm(parts):
        return (*parts, "scale")
    return (*parts, "kernel")
