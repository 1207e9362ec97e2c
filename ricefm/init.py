"""The published model's initial weights, drawn once in NumPy for both backends.

A from-scratch run of either trainer starts from :func:`initial_state`, so the torch and the Flax
trainer begin at bit-identical parameters (DESIGN.md section 5). The laws are those the published
torch code gets from its modules: ``encoder.embedding`` U(-0.1, 0.1) (its ``init_weights``), the
other embeddings (flag, modality) N(0, 1) (``nn.Embedding``), every Linear weight and bias
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (``nn.Linear``'s kaiming-uniform with a = sqrt(5)), LayerNorm
weight 1 and bias 0. Each tensor draws from its own stream keyed by (seed, its name), so adding a
head or a layer never changes the numbers of the others.

:func:`parameter_shapes` is also the published state-dict key order (the order of the published
module tree), which the published-format writer keeps.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Mapping

import numpy as np

GENE_EMBEDDING_RANGE = 0.1  # published init_weights: encoder.embedding uniform(-0.1, 0.1)
NORMAL_EMBEDDINGS = ("flag_encoder.weight", "mod_encoder.embedding.weight")


def _get(model: Any, field: str, default: Any = None) -> Any:
    return model.get(field, default) if isinstance(model, Mapping) or hasattr(model, "get") else getattr(model, field)


def parameter_shapes(model: Any, vocab_size: int, n_cls: int = 1) -> dict[str, tuple[int, ...]]:
    """Every parameter of the published model (torch names and layout), in state-dict order.

    ``model`` is a model config (``d_model``, ``n_heads``, ``n_layers``, ``d_hid``, ``n_modalities``,
    ``n_layers_cls``); ``n_cls > 1`` adds the cell-type head ``cls_decoder`` (as published, 1 = none).
    """
    d, d_hid = int(_get(model, "d_model")), int(_get(model, "d_hid"))
    n_layers, n_mod = int(_get(model, "n_layers")), int(_get(model, "n_modalities", 2))
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (d,)
        shapes[f"{name}.bias"] = (d,)

    shapes["encoder.embedding.weight"] = (vocab_size, d)
    norm("encoder.enc_norm")
    shapes["flag_encoder.weight"] = (2, d)
    linear("value_encoder.linear1", 1, d)
    linear("value_encoder.linear2", d, d)
    norm("value_encoder.norm")
    shapes["mod_encoder.embedding.weight"] = (n_mod, d)
    norm("mod_encoder.enc_norm")
    for i in range(n_layers):
        layer = f"transformer_encoder.layers.{i}"
        linear(f"{layer}.self_attn.Wqkv", d, 3 * d)
        linear(f"{layer}.self_attn.out_proj", d, d)
        linear(f"{layer}.linear1", d, d_hid)
        linear(f"{layer}.linear2", d_hid, d)
        norm(f"{layer}.norm1")
        norm(f"{layer}.norm2")
    linear("decoder.fc.0", d, d)
    linear("decoder.fc.2", d, d)
    linear("decoder.fc.4", d, 1)
    linear("mvc_decoder.gene2query", d, d)
    linear("mvc_decoder.W", d, d, bias=False)
    if n_cls > 1:
        for i in range(int(_get(model, "n_layers_cls", 3)) - 1):
            linear(f"cls_decoder._decoder.{3 * i}", d, d)
            norm(f"cls_decoder._decoder.{3 * i + 2}")
        linear("cls_decoder.out_layer", d, n_cls)
    return shapes


def _is_norm(key: str, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """LayerNorm parameters are the 1-D weights (a Linear weight is 2-D) and their biases."""
    module = key.rsplit(".", 1)[0]
    return len(shapes.get(f"{module}.weight", ())) == 1


def tensor_rng(seed: int, key: str) -> np.random.Generator:
    """The stream one tensor draws from: a function of (seed, name) only."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode())])


def initial_state(model: Any, vocab_size: int, seed: int, n_cls: int = 1) -> dict[str, np.ndarray]:
    """Float32 initial weights in published names and torch layout (see the module docstring)."""
    shapes = parameter_shapes(model, vocab_size, n_cls)
    state: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        rng = tensor_rng(seed, key)
        if key == "encoder.embedding.weight":
            value = rng.uniform(-GENE_EMBEDDING_RANGE, GENE_EMBEDDING_RANGE, shape)
        elif key in NORMAL_EMBEDDINGS:
            value = rng.standard_normal(shape)
        elif _is_norm(key, shapes):
            value = np.ones(shape) if key.endswith(".weight") else np.zeros(shape)
        else:  # Linear weight (out, in) or bias: bound from the weight's fan-in
            fan_in = shapes[key.rsplit(".", 1)[0] + ".weight"][1]
            bound = 1.0 / math.sqrt(fan_in)
            value = rng.uniform(-bound, bound, shape)
        state[key] = np.asarray(value, dtype=np.float32)
    return state
