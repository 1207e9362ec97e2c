"""Multi-head attention kernels behind one switch: exact math and ``jax.nn.dot_product_attention``.

Mirrors ``ricefm_npu/attention.py``. Kernels take q (B, Lq, H, hd), k and v (B, Lk, H, hd) (the
layout of ``jax.nn.dot_product_attention``), a bool ``masked`` broadcastable to (B, H, Lq, Lk)
that is True where a key is ignored, and the attention-weight dropout module; they return
(B, Lq, H, hd). ``dot_product_attention`` (cuDNN on GPU, XLA elsewhere) has no dropout, so it
refuses to run while attention dropout is active. ``math`` is one custom-gradient function,
``softmax_attention``, as torch's is one autograd Function: the scale on q, padding as an additive
-inf bias, the gen stream's own token as one more key column, and a written-out backward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("math", "dot_product")


def masked_bias(masked: jax.Array, dtype) -> jax.Array:
    """0 where a key is seen, -inf where ``masked``: added to the scores, its gradient passes through
    (a ``where`` would be one more select over the scores each way)."""
    return jnp.where(masked, -jnp.inf, jnp.zeros((), dtype))


def _dropped(x: jax.Array, keep: jax.Array | None) -> jax.Array:
    """``x`` zeroed where ``keep`` is False (as is, without a mask)."""
    return x if keep is None else jnp.where(keep, x, 0.0)


def _split_mask(keep: jax.Array | None, n: int) -> tuple[jax.Array | None, jax.Array | None]:
    """The mask's columns for the ``n`` keys and for the extra (own-token) key."""
    return (None, None) if keep is None else (keep[..., :n], keep[..., n:])


def _softmax_forward(q, k, v, bias, keep, extra_score, extra_value):
    extra = extra_score is not None
    keys, own = _split_mask(keep, k.shape[1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias
    top = scores.max(-1, keepdims=True)
    if extra:
        top = jnp.maximum(top, extra_score)
    e = jnp.exp(scores - top)
    total = e.sum(-1, keepdims=True)
    if extra:
        e_extra = jnp.exp(extra_score - top)
        total = total + e_extra
    probs = e / total
    out = jnp.einsum("bhqk,bkhd->bqhd", _dropped(probs, keys), v)
    if not extra:
        return out, (q, k, v, probs, None, keep, extra_value)
    p_extra = e_extra / total
    out = out + jnp.swapaxes(_dropped(p_extra, own), 1, 2) * extra_value
    return out, (q, k, v, probs, p_extra, keep, extra_value)


@jax.custom_vjp
def softmax_attention(q, k, v, bias, keep, extra_score, extra_value):
    """softmax([q k^T + bias ; extra_score]) @ [v ; extra_value], the probabilities zeroed where
    ``keep`` (bool, attention dropout; its 1/(1-p) left to the caller) is False. Mirrors torch's
    ``SoftmaxAttention``: the backward is written out, so the scores' gradient is one pass,
    p * (keep*g - sum(p*keep*g)), rather than autodiff's chain through the softmax, the selects of
    the mask and of the padding, and (gen stream) the split normalisation. q (B, Lq, H, hd) comes
    scaled; ``extra_score`` (B, H, Lq, 1) and ``extra_value`` (B, Lq, H, hd) are one more key per
    query: the gen stream's own token."""
    return _softmax_forward(q, k, v, bias, keep, extra_score, extra_value)[0]


def _softmax_attention_bwd(residuals, d_out):
    q, k, v, probs, p_extra, keep, extra_value = residuals
    extra = extra_value is not None
    keys, own = _split_mask(keep, k.shape[1])
    d_v = jnp.einsum("bhqk,bqhd->bkhd", _dropped(probs, keys), d_out)
    d_kept = _dropped(jnp.einsum("bqhd,bkhd->bhqk", d_out, v), keys)
    dot = (probs * d_kept).sum(-1, keepdims=True)
    if extra:
        d_kept_extra = _dropped(jnp.einsum("bqhd,bqhd->bhq", d_out, extra_value)[..., None], own)
        dot = dot + p_extra * d_kept_extra
    d_scores = probs * (d_kept - dot)
    d_q = jnp.einsum("bhqk,bkhd->bqhd", d_scores, k)
    d_k = jnp.einsum("bhqk,bqhd->bkhd", d_scores, q)
    if not extra:
        return d_q, d_k, d_v, None, None, None, None
    return (d_q, d_k, d_v, None, None, p_extra * (d_kept_extra - dot),
            jnp.swapaxes(_dropped(p_extra, own), 1, 2) * d_out)


softmax_attention.defvjp(_softmax_forward, _softmax_attention_bwd)


def attend(q, k, v, masked, dropout=None, extra_score=None, extra_value=None):
    """Exact attention, softmax(q k^T / sqrt(hd), -inf where ``masked`` [; extra_score]) @ [v ; extra_value],
    with attention-weight dropout when ``dropout`` is active. The scale goes on q (hd / Lk the size
    of the scores), the 1/(1-p) of dropout on the (B, Lq, H, hd) result; ``extra_score`` comes scaled
    and masked. Mirrors torch's ``attend``."""
    scaled = q * (1.0 / math.sqrt(q.shape[-1]))
    n_keys = k.shape[1] + (extra_score is not None)
    keep = None if dropout is None else dropout.keep_mask(q.shape[:1] + (q.shape[2], q.shape[1], n_keys))
    out = softmax_attention(scaled, k, v, masked_bias(masked, q.dtype), keep, extra_score, extra_value)
    return out if keep is None else out * dropout.output_scale()


def math_attention(q, k, v, masked, dropout=None):
    return attend(q, k, v, masked, dropout)


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
