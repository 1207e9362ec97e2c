"""Multi-head attention kernels behind one switch: exact math and ``jax.nn.dot_product_attention``.

Mirrors ``ricefm_npu/attention.py``. Kernels take q (B, Lq, H, hd), k and v (B, Lk, H, hd) (the
layout of ``jax.nn.dot_product_attention``), a bool ``masked`` broadcastable to (B, H, Lq, Lk)
that is True where a key is ignored, and the attention-weight dropout module; they return
(B, Lq, H, hd). ``dot_product_attention`` (cuDNN on GPU, XLA elsewhere) has no dropout, so it
refuses to run while attention dropout is active.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("math", "dot_product")


def math_attention(q, k, v, masked, dropout=None):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(q.shape[-1]))
    scores = jnp.where(masked, -jnp.inf, scores)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:  # its 1/(1-p) goes on the (B, Lq, H, hd) result, not on the probabilities
        return jnp.einsum("bhqk,bkhd->bqhd", dropout(probs, scale=False), v) * dropout.output_scale()
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def dot_product_attention(q, k, v, masked, dropout=None):
    if dropout is not None and dropout.rate > 0 and not dropout.deterministic:
        raise ValueError("attention='dot_product' has no attention dropout; use 'math' for training with dropout "
                         "or set model.dropout=0")
    return jax.nn.dot_product_attention(q, k, v, mask=~masked)


_KERNELS = {"math": math_attention, "dot_product": dot_product_attention}


def get_attention(name: str):
    if name not in _KERNELS:
        raise ValueError(f"attention {name!r} is not one of {IMPLEMENTATIONS}")
    return _KERNELS[name]
