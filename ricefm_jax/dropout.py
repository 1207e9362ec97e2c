"""Dropout whose random mask is cheap, where ``jax.random.bernoulli`` costs more than the model.

``nnx.Dropout`` draws a threefry-2x32 uniform (20 rounds) per element; on the attention
probabilities (B x H x L x L per layer and stream) that costs more than the attention matmuls on
CPU. Here the stream gives one key per call (its fold_in, as for ``nnx.Dropout``), whose two words
seed a counter hash of each element's (row, column): ``lowbias32`` (a 32-bit integer finaliser with
near-ideal avalanche), a few integer ops that XLA fuses into the op that uses the mask. An
element is kept when its 32-bit draw is below ``round(keep_prob * 2**32)``, so the rate is the
configured one to within 2**-33. Same module, RNG stream and ``nnx.reseed`` behaviour as
``nnx.Dropout``. Mirrors ``ricefm_npu/dropout.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _lowbias32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def keep_threshold(keep_prob: float) -> int:
    """The uint32 draw below which an element is kept: P(keep) = threshold / 2**32."""
    return min(int(round(keep_prob * 2 ** 32)), 2 ** 32 - 1)


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
    """A bool array of ``shape``, True with probability ``keep_prob`` per element, independently."""
    seed = jax.random.key_data(key).reshape(-1)[:2]  # the stream's key is a fold_in, a hash already
    rows = math.prod(shape[:-1])
    if rows >= 2 ** 32 or shape[-1] >= 2 ** 32:
        raise ValueError(f"dropout mask {shape} has more than 2**32 rows or columns")
    row = jax.lax.broadcasted_iota(jnp.uint32, (rows, 1), 0)
    col = jax.lax.broadcasted_iota(jnp.uint32, (1, shape[-1]), 1)
    row_key = _lowbias32(row * jnp.uint32(0x9E3779B9) + seed[0])  # (rows, 1): one hash a row
    bits = _lowbias32(row_key ^ (col * jnp.uint32(0x85EBCA6B) + seed[1]))
    return (bits < jnp.uint32(keep_threshold(keep_prob))).reshape(shape)


def next_key(stream: nnx.RngStream) -> jax.Array:
    """``stream()``: fold the count into the key and advance it. nnx's own ``count[...] += 1`` compares
    the shardings of old and new count, and a tracer's missing sharding builds an error message that
    walks the whole traced graph: 98 dropout calls made tracing a base-config step 3.5x slower."""
    if hasattr(stream.count, "set_value"):  # flax >= 0.12 (``.value`` is deprecated there)
        count = stream.count.get_value()
        key = jax.random.fold_in(stream.key.get_value(), count)
        stream.count.set_value(count + 1)
    else:
        count = stream.count.value
        key = jax.random.fold_in(stream.key.value, count)
        stream.count.value = count + 1
    return key


def apply_dropout(x: jax.Array, rate: float, key: jax.Array, scale: bool = True) -> jax.Array:
    """Inverted dropout of ``x``; with ``scale=False`` the 1/(1-rate) factor is left to the caller."""
    keep = keep_mask(key, x.shape, 1.0 - rate)
    return jnp.where(keep, x / (1.0 - rate) if scale else x, jnp.zeros((), x.dtype))


class Dropout(nnx.Dropout):
    """``nnx.Dropout`` (same state, stream and flags) with the mask above unless ``fast`` is off."""

    fast = True

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None, scale: bool = True):
        deterministic = self.deterministic if deterministic is None else deterministic
        if not self.fast or self.rate == 0.0 or deterministic or self.rate >= 1.0 or self.broadcast_dims:
            out = super().__call__(inputs, deterministic=deterministic, rngs=rngs)
            return out if scale or self.rate == 0.0 or deterministic else out * (1.0 - self.rate)
        return apply_dropout(inputs, self.rate, self._key(rngs), scale)

    def _key(self, rngs=None) -> jax.Array:
        """The key for one call: ``rngs`` (a key, stream or Rngs) if given, else this module's stream."""
        stream = self.rngs if rngs is None else rngs
        if isinstance(stream, jax.Array):
            return stream
        return next_key(stream[self.rng_collection] if isinstance(stream, nnx.Rngs) else stream)

    def keep_mask(self, shape: tuple[int, ...]) -> jax.Array | None:
        """The mask a call on an array of ``shape`` would apply (drawing the same key), or None when
        inactive; for callers that drop parts of one array without building it."""
        if self.rate == 0.0 or self.deterministic or self.rate >= 1.0:
            return None
        if self.broadcast_dims:
            raise ValueError("keep_mask draws one element at a time; this Dropout has broadcast_dims")
        key = self._key()
        if self.fast:
            return keep_mask(key, shape, 1.0 - self.rate)
        return jax.random.bernoulli(key, 1.0 - self.rate, shape)  # nnx.Dropout's own mask

    def output_scale(self) -> float:
        """The factor a ``scale=False`` caller applies to its (smaller) result: 1/(1-rate) when active."""
        return 1.0 if self.rate == 0.0 or self.deterministic or self.rate >= 1.0 else 1.0 / (1.0 - self.rate)
