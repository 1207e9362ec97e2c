"""torch vs Flax on random inputs: padding in both streams, both modalities, the cell-embedding pass,
pcpt-only mode, gradients; bf16 compute; and `ricefm embed` agreeing across backends."""

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from flax import nnx

from ricefm.embed import embed_h5ad, load_embedder
from ricefm_configs import tiny
from ricefm_jax.model import RiceFM as FlaxRiceFM
from ricefm_jax.objective import pretraining_loss as flax_loss
from ricefm_jax.params import load_state_dict, state_dict
from ricefm_npu.model import RiceFM as TorchRiceFM
from ricefm_npu.objective import pretraining_loss as torch_loss

from conftest import FIXTURES

V = 300


def random_batch(seed=0, B=6, Lp=20, Lg=15):
    rng = np.random.default_rng(seed)
    pcpt_ids = rng.integers(0, V - 3, (B, Lp))
    pcpt_ids[:, 0] = V - 2  # <cls>
    gen_ids = rng.integers(0, V - 3, (B, Lg))
    p_len = rng.integers(2, Lp + 1, B)
    g_len = rng.integers(1, Lg + 1, B)
    pcpt_pad = np.arange(Lp)[None] >= p_len[:, None]
    gen_pad = np.arange(Lg)[None] >= g_len[:, None]
    pcpt_ids[pcpt_pad], gen_ids[gen_pad] = V - 3, V - 3
    values = rng.integers(1, 51, (B, Lp)).astype(np.float32)
    values[:, 0], values[pcpt_pad] = -2, -2
    targets = rng.integers(1, 51, (B, Lg)).astype(np.float32)
    targets[gen_pad] = -2
    return {"pcpt_gene_ids": pcpt_ids, "pcpt_values": values, "pcpt_key_padding_mask": pcpt_pad,
            "gen_gene_ids": gen_ids, "gen_target_values": targets, "gen_key_padding_mask": gen_pad,
            "mod_types": rng.integers(0, 2, B)}


@pytest.fixture(scope="module")
def pair():
    cfg = tiny.get_config().model
    torch.manual_seed(3)
    tm = TorchRiceFM.from_config(cfg, V, attention="math").eval()
    fm = FlaxRiceFM.from_config(cfg, V, attention="math")
    load_state_dict(fm, {k: v.numpy() for k, v in tm.state_dict().items()}, "torch")
    fm.eval()
    return tm, fm


def test_outputs_agree_in_every_mode(pair):
    tm, fm = pair
    b = random_batch()
    t = {k: torch.from_numpy(v) for k, v in b.items()}
    j = {k: jnp.asarray(v) for k, v in b.items()}
    args = ("pcpt_gene_ids", "pcpt_values", "pcpt_key_padding_mask", "mod_types")
    with torch.no_grad():
        to = tm(*(t[a] for a in args), t["gen_gene_ids"], t["gen_key_padding_mask"])
        to2 = tm(*(t[a] for a in args), t["gen_gene_ids"], t["gen_key_padding_mask"], input_cell_emb=to["cell_emb"])
        tp = tm(*(t[a] for a in args))
    fo = fm(*(j[a] for a in args), j["gen_gene_ids"], j["gen_key_padding_mask"])
    fo2 = fm(*(j[a] for a in args), j["gen_gene_ids"], j["gen_key_padding_mask"], input_cell_emb=fo["cell_emb"])
    fp = fm(*(j[a] for a in args))
    for ours, theirs in ((fo, to), (fo2, to2), (fp, tp)):
        for k in theirs:
            np.testing.assert_allclose(np.asarray(ours[k]), theirs[k].numpy(), atol=1e-5, rtol=1e-5, err_msg=k)


def test_gradients_agree(pair):
    tm, fm = pair
    b = random_batch(seed=1)
    total_t, parts_t = torch_loss(tm, {k: torch.from_numpy(v) for k, v in b.items()})
    tm.zero_grad()
    total_t.backward()
    graphdef, params, rest = nnx.split(fm, nnx.Param, ...)
    j = {k: jnp.asarray(v) for k, v in b.items()}
    (total_j, _), grads = jax.value_and_grad(lambda p: flax_loss(nnx.merge(graphdef, p, rest), j), has_aux=True)(params)
    np.testing.assert_allclose(float(total_j), float(total_t), rtol=1e-6)
    holder = FlaxRiceFM.from_config(tiny.get_config().model, V)
    nnx.update(holder, grads)
    g = state_dict(holder)
    for k, p in tm.named_parameters():
        want = p.grad.numpy()
        assert np.abs(g[k] - want).max() <= 1e-4 * max(np.abs(want).max(), 1e-12), k


def test_dot_product_attention_equals_math(pair):
    _, fm = pair
    j = {k: jnp.asarray(v) for k, v in random_batch(seed=2).items()}
    args = (j["pcpt_gene_ids"], j["pcpt_values"], j["pcpt_key_padding_mask"], j["mod_types"], j["gen_gene_ids"],
            j["gen_key_padding_mask"])
    ref = fm(*args)
    fm.set_attention("dot_product")
    fast = fm(*args)
    fm.set_attention("math")
    for k in ref:
        np.testing.assert_allclose(np.asarray(fast[k]), np.asarray(ref[k]), atol=1e-5, rtol=1e-5)


def test_bf16_compute_within_2e2(pair):
    tm, _ = pair
    cfg = tiny.get_config().model
    low = FlaxRiceFM.from_config(cfg, V, dtype=jnp.bfloat16)
    load_state_dict(low, {k: v.numpy() for k, v in tm.state_dict().items()}, "torch")
    low.eval()
    j = {k: jnp.asarray(v) for k, v in random_batch(seed=4).items()}
    args = (j["pcpt_gene_ids"], j["pcpt_values"], j["pcpt_key_padding_mask"], j["mod_types"], j["gen_gene_ids"],
            j["gen_key_padding_mask"])
    with torch.no_grad():
        ref = tm(*(torch.from_numpy(np.asarray(a)) for a in args))
    out = low(*args)
    for k in ("pcpt_transformer_out", "gen_transformer_out", "cell_emb"):
        assert np.abs(np.asarray(out[k], np.float32) - ref[k].numpy()).max() <= 2e-2 * max(
            1.0, float(ref[k].abs().max())), k


def test_embed_agrees_across_backends(tmp_path, reference):
    from ricefm.vocab import GeneVocab
    vocab = GeneVocab.load(FIXTURES / "vocab.json")
    names = {i: g for g, i in vocab.as_dict().items()}
    genes = [names[int(i)] for i in reference["in/raw_col_gene_ids"]]
    path = tmp_path / "cells.h5ad"
    ad.AnnData(X=sp.csr_matrix(reference["in/raw_counts"]), var=pd.DataFrame(index=genes)).write_h5ad(path)
    embs = {}
    for backend in ("torch", "jax"):
        embed_h5ad(path, tmp_path / f"{backend}.h5ad", load_embedder(backend, FIXTURES, device="cpu"),
                   max_seq_len=40, batch_size=4, progress=False)
        embs[backend] = ad.read_h5ad(tmp_path / f"{backend}.h5ad").obsm["X_ricefm"]
    a, b = embs["torch"], embs["jax"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99999 and np.abs(a - b).max() <= 1e-4
