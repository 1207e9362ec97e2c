"""The JAX math attention's custom-gradient kernel (ricefm_jax/attention.py ``softmax_attention``): its
hand-written backward is exact. Mirrors tests/test_torch_attention.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ricefm_jax import attention as jax_attention


def float64():
    """float64 for one block: ``jax.enable_x64(True)`` on new JAX, ``jax.experimental.enable_x64()`` before."""
    if callable(getattr(jax, "enable_x64", None)):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


@pytest.mark.parametrize("own_token", [False, True], ids=["pcpt", "gen"])
@pytest.mark.parametrize("drop", [False, True], ids=["no_dropout", "dropout"])
def test_jax_softmax_attention_gradients_are_exact(own_token, drop):
    """The hand-written backward of ``softmax_attention`` (the dropout gradient as p*(keep*g - sum(p*keep*g)),
    the gen stream's own token as one more column) against finite differences in float64
    (``check_grads``), and its outputs and gradients against autodiff of the plain ops on the same mask."""
    with float64():
        rng = np.random.default_rng(0)
        B, H, Lq, Lk, hd = 2, 3, 5, 7, 4
        q, k, v = (jnp.asarray(rng.standard_normal((B, L, H, hd))) for L in (Lq, Lk, Lk))
        masked = np.zeros((B, 1, 1, Lk), bool)
        masked[0, ..., -2:] = True
        bias = jax_attention.masked_bias(jnp.asarray(masked), jnp.float64)
        extra = ((jnp.asarray(rng.standard_normal((B, H, Lq, 1))), jnp.asarray(rng.standard_normal((B, Lq, H, hd))))
                 if own_token else (None, None))
        keep = jnp.asarray(rng.random((B, H, Lq, Lk + own_token)) < 0.7) if drop else None

        def fused(q, k, v, es, ev):
            return jax_attention.softmax_attention(q, k, v, bias, keep, es, ev)

        def plain(q, k, v, es, ev):
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias
            p = jax.nn.softmax(s if es is None else jnp.concatenate([s, es], -1), -1)
            p = p if keep is None else jnp.where(keep, p, 0.0)
            out = jnp.einsum("bhqk,bkhd->bqhd", p[..., :Lk], v)
            return out if ev is None else out + jnp.swapaxes(p[..., Lk:], 1, 2) * ev

        inputs = (q, k, v, *extra)
        check_grads(fused, inputs, order=1, modes=["rev"])
        d_out = jnp.asarray(rng.standard_normal((B, Lq, H, hd)))
        # DESIGN.md's output and gradient tolerances (here float64, so far inside them)
        np.testing.assert_allclose(fused(*inputs), plain(*inputs), rtol=1e-5, atol=1e-5)
        n_diff = 5 if own_token else 3  # the inputs that are arrays
        got, want = (jax.vjp(lambda *a: f(*a, *inputs[n_diff:]), *inputs[:n_diff])[1](d_out) for f in (fused, plain))
        for a, b in zip(got, want):
            assert float(jnp.abs(a - b).max()) <= 1e-4 * float(jnp.abs(b).max())
