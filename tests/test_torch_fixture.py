"""The torch model reproduces every tensor of the published code's fixture (DESIGN.md section 5)."""

import numpy as np
import pytest
import torch

from ricefm.errors import RiceFMInputError
from ricefm_npu.checkpoints import load_published, load_torch_checkpoint, save_native, save_published, strict_load
from ricefm_npu.objective import pretraining_loss

from conftest import FIXTURES
from reference_outputs import assert_generative_passes


def close(got, want, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(got.detach().numpy(), want, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def published():
    model, cfg, vocab = load_published(FIXTURES)
    return model.eval(), cfg, vocab


def tensors(reference, prefix):
    return {k[len(prefix):]: torch.from_numpy(v) for k, v in reference.items() if k.startswith(prefix)}


def gen_batch(reference):
    b = tensors(reference, "in/")
    return {k: b[k] for k in ("pcpt_gene_ids", "pcpt_values", "pcpt_key_padding_mask", "gen_gene_ids",
                              "gen_target_values", "gen_key_padding_mask", "mod_types")}


def test_config_built_from_args_json(published):
    model, cfg, vocab = published
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_hid, len(vocab)) == (64, 4, 2, 128, 123)
    assert sum(p.numel() for p in model.parameters()) == 96_385


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_pass1_pass2_and_every_layer(published, reference, attention):
    model = published[0]
    model.set_attention(attention)
    b = gen_batch(reference)
    inputs = {k: v for k, v in b.items() if k != "gen_target_values"}
    with torch.no_grad():
        o = model(**inputs, return_layers=True)
        o2 = model(**inputs, do_mvc=False, input_cell_emb=o["cell_emb"])
    assert_generative_passes(o, o2, reference, lambda t: t.detach().numpy())
    model.set_attention("math")


def test_pcpt_only_and_inference_forward(published, reference):
    model = published[0]
    b = gen_batch(reference)
    inf = tensors(reference, "infer_in/")
    with torch.no_grad():
        p = model(b["pcpt_gene_ids"], b["pcpt_values"], b["pcpt_key_padding_mask"], b["mod_types"])
        i = model(inf["gene_ids"], inf["values"], inf["key_padding_mask"], inf["mod_types"])
    for k in ("transformer_out", "pcpt_preds", "mvc_output", "cell_emb"):
        ours = "pcpt_transformer_out" if k == "transformer_out" else k
        close(p[ours], reference[f"pcptonly/{k}"])
        close(i[ours], reference[f"infer/{k}"])


def test_loss_terms(published, reference):
    with torch.no_grad():
        total, parts = pretraining_loss(published[0], gen_batch(reference), cell_emb_pass=True)
        without, _ = pretraining_loss(published[0], gen_batch(reference), cell_emb_pass=False)
    for ours, theirs in (("mse", "mse"), ("mvc", "mvc"), ("gen", "gen"), ("total", "total")):
        np.testing.assert_allclose(parts[ours].item(), reference[f"loss/{theirs}"], rtol=1e-6)
    np.testing.assert_allclose(without.item(), reference["loss/total_without_gen"], rtol=1e-6)


def test_gradients_and_one_clipped_adam_step(reference):
    model = load_published(FIXTURES)[0].eval()
    total, _ = pretraining_loss(model, gen_batch(reference), cell_emb_pass=True)
    total.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    for k, g in grads.items():
        want = reference[f"grad/{k}"]
        scale = max(np.abs(want).max(), 1e-12)
        assert np.abs(g.numpy() - want).max() <= 1e-4 * scale, k
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    np.testing.assert_allclose(norm.item(), reference["opt/grad_total_norm_before_clip"], rtol=1e-5)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    d = model.d_model
    for k, p in model.named_parameters():
        got, want = p.detach().numpy(), reference[f"after_step/{k}"]
        if k.endswith("self_attn.Wqkv.bias"):  # the key-bias slice has a true gradient of 0 (round-off only)
            np.testing.assert_allclose(got[d:2 * d], want[d:2 * d], atol=1e-4, rtol=0, err_msg=k)
            got, want = np.concatenate([got[:d], got[2 * d:]]), np.concatenate([want[:d], want[2 * d:]])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=k)
    # flag row 0 is unused: zero gradient, unchanged by the step
    assert torch.equal(model.flag_encoder.weight[0], before["flag_encoder.weight"][0])
    assert not grads["flag_encoder.weight"][0].any()


def test_strict_loading_lists_every_problem(published, tmp_path):
    model = published[0]
    state = dict(model.state_dict())
    state.pop("decoder.fc.0.bias")
    state["extra.weight"] = torch.zeros(1)
    state["mvc_decoder.W.weight"] = torch.zeros(3, 3)
    with pytest.raises(RiceFMInputError) as e:
        strict_load(model, state, "ckpt")
    msg = str(e.value)
    assert "missing: decoder.fc.0.bias" in msg and "unknown: extra.weight" in msg
    assert "mis-shaped: mvc_decoder.W.weight (3, 3) != (64, 64)" in msg


def test_native_and_published_round_trip(published, tmp_path):
    model, cfg, vocab = published
    save_native(tmp_path / "native", model, cfg, vocab)
    save_published(tmp_path / "pub", model, cfg, vocab)
    for folder in ("native", "pub"):
        m2, cfg2, vocab2 = load_torch_checkpoint(tmp_path / folder)
        assert vocab2 == vocab and cfg2.d_model == 64
        for (k, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items()):
            assert torch.equal(a, b), k
