"""Dropout masks (ricefm_npu/dropout.py, ricefm_jax/dropout.py): the configured rate, independent
elements, inverted scaling, and the attention kernels' deferred 1/(1-p) equal to plain dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ricefm_jax import attention as jax_attention
from ricefm_jax import dropout as jax_dropout
from ricefm_npu import attention as torch_attention
from ricefm_npu import dropout as torch_dropout
from tests.tolerances import assert_rate

SHAPE = (4, 4, 250, 251)  # 1,004,000 elements, an odd last axis as attention's (keys + own gen token)
N = int(np.prod(SHAPE))


def _jax_mask(seed: int, keep: float) -> np.ndarray:
    return np.asarray(jax_dropout.keep_mask(jax.random.key(seed), SHAPE, keep))


def _torch_mask(seed: int, keep: float) -> np.ndarray:
    torch.manual_seed(seed)
    return torch_dropout.keep_mask(SHAPE, keep, torch.device("cpu")).numpy()


@pytest.mark.parametrize("make", [_jax_mask, _torch_mask], ids=["jax", "torch"])
@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5])
def test_mask_drops_the_configured_fraction_independently(make, rate):
    mask = make(3, 1.0 - rate)
    assert mask.shape == SHAPE and mask.dtype == np.bool_
    assert_rate(float(1.0 - mask.mean()), rate, N)
    # every slice of the mask drops at the rate too (no stuck rows, heads or column bands)
    assert_rate(float(1.0 - mask[..., :125].mean()), rate, N // 2)
    assert_rate(float(1.0 - mask[1].mean()), rate, N // 4)
    # neighbours along both axes and across heads are uncorrelated (|r| < 6 / sqrt(n))
    for a, b in ((mask[..., :-1], mask[..., 1:]), (mask[:, :, :-1], mask[:, :, 1:]), (mask[:, 0], mask[:, 1])):
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 6 / np.sqrt(a.size), r
    other = make(4, 1.0 - rate)  # another key / generator state: another mask
    assert abs(np.corrcoef(mask.ravel(), other.ravel())[0, 1]) < 6 / np.sqrt(N)


def test_thresholds_quantise_the_rate_finely():
    for keep in (0.5, 0.8, 0.9, 0.75):
        assert abs((torch_dropout.keep_threshold(keep) + 2 ** 15) / 2 ** 16 - keep) <= 2 ** -17
        assert abs(jax_dropout.keep_threshold(keep) / 2 ** 32 - keep) <= 2 ** -33


def test_jax_dropout_module_scales_and_follows_its_rng_stream():
    x = jnp.ones((1000, 1004))
    drop = jax_dropout.Dropout(0.2, rngs=nnx.Rngs(dropout=0))
    y = np.asarray(drop(x))
    assert set(np.unique(y).tolist()) == {0.0, np.float32(1 / 0.8)}
    assert_rate(float((y == 0).mean()), 0.2, y.size)
    assert not np.array_equal(y, np.asarray(drop(x)))  # each call draws a new key from the stream
    nnx.reseed(drop, dropout=7)
    a = np.asarray(drop(x))
    nnx.reseed(drop, dropout=7)
    np.testing.assert_array_equal(a, np.asarray(drop(x)))  # (seed, step) keys make resume exact
    drop.eval()
    np.testing.assert_array_equal(np.asarray(drop(x)), np.asarray(x))
    framework = jax_dropout.Dropout(0.2, rngs=nnx.Rngs(dropout=0))
    framework.fast = False
    z = np.asarray(framework(x))
    assert_rate(float((z == 0).mean()), 0.2, z.size)
    assert not np.array_equal(z == 0, y == 0)  # nnx.Dropout's own bernoulli masks


def test_torch_dropout_module_scales_and_follows_the_generator():
    drop = torch_dropout.Dropout(0.3).train()
    x = torch.ones(1000, 1004)
    torch.manual_seed(1)
    y = drop(x)
    assert sorted(torch.unique(y).tolist()) == pytest.approx([0.0, 1 / 0.7])
    assert_rate(float((y == 0).float().mean()), 0.3, y.numel())
    torch.manual_seed(1)
    torch.testing.assert_close(drop(x), y, rtol=0, atol=0)
    assert torch.equal(drop.eval()(x), x)
    drop.train().fast = False
    assert_rate(float((drop(x) == 0).float().mean()), 0.3, y.numel())



def test_torch_dropout_gradient_reaches_only_kept_elements():
    x = torch.randn(64, 257, requires_grad=True)
    g = torch.randn(64, 257)
    torch.manual_seed(3)
    y = torch_dropout.apply_dropout(x, 0.4, True)
    y.backward(g)
    torch.manual_seed(3)
    keep = torch_dropout.keep_mask(x.shape, 0.6, x.device)
    assert_rate(1 - float(keep.float().mean()), 0.4, keep.numel())
    torch.testing.assert_close(y, torch.where(keep, x.detach(), 0.0) * (1 / 0.6), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, torch.where(keep, g, 0.0) * (1 / 0.6), rtol=0, atol=0)

def _probs(rng, b=2, h=4, lq=37, lk=41, hd=16):
    q, k, v = (rng.standard_normal((b, lq if i == 0 else lk, h, hd)).astype(np.float32) for i in range(3))
    masked = np.zeros((b, 1, 1, lk), bool)
    masked[1, ..., 30:] = True
    return q, k, v, masked


def test_jax_attention_defers_the_dropout_scale_exactly():
    q, k, v, masked = _probs(np.random.default_rng(0))
    drop = jax_dropout.Dropout(0.25, rngs=nnx.Rngs(dropout=5))
    got = np.asarray(jax_attention.math_attention(q, k, v, masked, drop))
    nnx.reseed(drop, dropout=5)
    key = drop.rngs()
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    probs = np.asarray(jax.nn.softmax(jnp.where(masked, -jnp.inf, scores), axis=-1))
    keep = np.asarray(jax_dropout.keep_mask(key, probs.shape, 0.75))
    want = np.einsum("bhqk,bkhd->bqhd", np.where(keep, probs / 0.75, 0), v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("fast", [True, False], ids=["fast", "framework"])
def test_jax_gen_attention_drops_one_mask_over_pcpt_keys_and_self(fast):
    from ricefm_jax.model import GenerativeSelfAttention

    rng = np.random.default_rng(2)
    attn = GenerativeSelfAttention(32, 4, 0.3, "math", jnp.float32, nnx.Rngs(0, dropout=3))
    attn.attn_dropout.fast = fast  # framework: nnx.Dropout's bernoulli masks, drawn the same way
    pcpt, gen = (jnp.asarray(rng.standard_normal((2, n, 32)), jnp.float32) for n in (9, 5))
    pcpt_pad = np.zeros((2, 9), bool)
    pcpt_pad[1, 7:] = True
    gen_pad = np.zeros((2, 5), bool)
    gen_pad[0, 4:] = True
    nnx.reseed(attn, dropout=11)
    _, got = attn(pcpt, pcpt_pad, gen, gen_pad)
    nnx.reseed(attn, dropout=11)
    attn.attn_dropout.keep_mask((2, 4, 9, 9))  # the pcpt stream's draw comes first
    keep = np.asarray(attn.attn_dropout.keep_mask((2, 4, 5, 10)))
    assert 0.5 < keep.mean() < 0.9
    _, k_p, v_p = (np.asarray(a) for a in attn._qkv(pcpt))
    q_g, k_g, v_g = (np.asarray(a) for a in attn._qkv(gen))
    scores = np.concatenate([np.einsum("bqhd,bkhd->bhqk", q_g, k_p),
                             np.einsum("bqhd,bqhd->bhq", q_g, k_g)[..., None]], -1) / np.sqrt(8)
    scores[np.broadcast_to(np.concatenate([pcpt_pad[:, None, None, :].repeat(5, 2),
                                           gen_pad[:, None, :, None]], -1), scores.shape)] = -np.inf
    probs = np.where(keep, np.asarray(jax.nn.softmax(scores, axis=-1)) / 0.7, 0.0)
    want = np.einsum("bhqk,bkhd->bqhd", probs[..., :-1], v_p) + np.swapaxes(probs[..., -1:], 1, 2) * v_g
    np.testing.assert_allclose(np.asarray(got), want.reshape(2, 5, 32), rtol=1e-5, atol=1e-6)

def test_torch_attention_defers_the_dropout_scale_exactly():
    q, k, v, masked = (torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 1, 2))) if a.ndim == 4 and a.shape[2] != 1
                       else torch.from_numpy(a) for a in _probs(np.random.default_rng(1)))
    torch.manual_seed(9)
    got = torch_attention.math_attention(q, k, v, masked, 0.25, training=True)
    torch.manual_seed(9)
    probs = torch.softmax((q @ k.transpose(-1, -2) / 4.0).masked_fill(masked, float("-inf")), -1)
    keep = torch_dropout.keep_mask(probs.shape, 0.75, torch.device("cpu"))
    torch.testing.assert_close(got, torch.where(keep, probs / 0.75, 0.0) @ v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_model_dropout_modules_follow_config(backend):
    from ricefm_configs import ricefm_base

    cfg = ricefm_base.get_config().model
    cfg.update(d_model=16, n_heads=2, n_layers=2, d_hid=16, dropout=0.3)
    if backend == "torch":
        from ricefm_npu.model import GenerativeSelfAttention, RiceFM
        model = RiceFM.from_config(cfg, 20, attention="math")
        drops = [m for m in model.modules() if isinstance(m, torch_dropout.Dropout)]
        flags = [m.fast for m in drops] + [m.fast_dropout for m in model.modules()
                                           if isinstance(m, GenerativeSelfAttention)]
    else:
        from ricefm_jax.model import RiceFM
        model = RiceFM.from_config(cfg, 20)
        drops = [m for _, m in nnx.iter_graph(model) if isinstance(m, jax_dropout.Dropout)]
        flags = [m.fast for m in drops]
    # value encoder + per layer: attention weights (JAX), dropout, dropout1, dropout2
    assert len(drops) == (1 + 4 * 2 if backend == "jax" else 1 + 3 * 2)
    assert all(flags) and {getattr(m, "rate", getattr(m, "p", None)) for m in drops} == {0.3}
    model.set_dropout_masks("framework")
    assert not any(m.fast for m in drops)
    with pytest.raises(ValueError, match="dropout_masks"):
        model.set_dropout_masks("cheap")
