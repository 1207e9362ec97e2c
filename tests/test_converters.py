"""`ricefm convert`: format detection, strict checks, bit-exact round trips, Flax reproducing the fixture."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from converters.formats import detect_format, load_checkpoint
from converters.names import flax_path, torch_key
from ricefm_cli.cli import main as cli
from ricefm.errors import RiceFMInputError
from ricefm_jax.checkpoints import load_flax_model
from ricefm_jax.model import RiceFM
from ricefm_npu.checkpoints import load_published, load_torch_checkpoint, save_native

from conftest import FIXTURES


def states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_name_table_is_the_flax_tree():
    m = RiceFM(123, d_model=64, n_heads=4, n_layers=2, d_hid=128)
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))]
    assert len(paths) == 46 and all(flax_path(torch_key(p)) == p for p in paths)
    with_head = RiceFM(123, d_model=64, n_heads=4, n_layers=2, d_hid=128, n_cls=7, n_layers_cls=3)
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(with_head, nnx.Param))]
    assert len(paths) == 56 and all(flax_path(torch_key(p)) == p for p in paths)
    assert flax_path("cls_decoder._decoder.2.weight") == ("cls_decoder", "_decoder", 2, "scale")


def test_seed_to_flax_to_seed_is_bit_exact(tmp_path, capsys):
    assert cli(["convert", str(FIXTURES), str(tmp_path / "flax"), "--to", "flax"]) == 0
    assert "(seed) ->" in capsys.readouterr().out and detect_format(tmp_path / "flax") == "flax"
    assert cli(["convert", str(tmp_path / "flax"), str(tmp_path / "seed"), "--to", "seed"]) == 0
    original, back = load_checkpoint(FIXTURES), load_checkpoint(tmp_path / "seed")
    states_equal(original.state, back.state)
    assert back.vocab == original.vocab and back.model.d_model == 64 and back.model.n_layers == 2
    sd = torch.load(tmp_path / "seed" / "best_model.pt", weights_only=True)  # still a published checkpoint
    assert list(sd) == list(torch.load(FIXTURES / "best_model.pt", weights_only=True))
    model, _, _ = load_published(tmp_path / "seed")
    assert sum(p.numel() for p in model.parameters()) == 96_385


def test_torch_to_flax_to_torch_is_bit_exact(tmp_path):
    model, cfg, vocab = load_published(FIXTURES)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the fixture weights
    save_native(tmp_path / "torch", model, cfg, vocab)
    assert cli(["convert", str(tmp_path / "torch"), str(tmp_path / "flax"), "--to", "flax"]) == 0
    assert cli(["convert", str(tmp_path / "flax"), str(tmp_path / "torch2"), "--to", "torch"]) == 0
    states_equal(load_checkpoint(tmp_path / "torch").state, load_checkpoint(tmp_path / "torch2").state)
    m2, _, _ = load_torch_checkpoint(tmp_path / "flax")  # torch reads a Flax folder directly, too
    for (k, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_published_converted_to_flax_reproduces_fixture(tmp_path, reference):
    cli(["convert", str(FIXTURES), str(tmp_path / "flax"), "--to", "flax"])
    model, cfg, vocab = load_flax_model(tmp_path / "flax")
    model.eval()
    b = {k[3:]: jnp.asarray(v) for k, v in reference.items() if k.startswith("in/")}
    o = model(b["pcpt_gene_ids"], b["pcpt_values"], b["pcpt_key_padding_mask"], b["mod_types"], b["gen_gene_ids"],
              b["gen_key_padding_mask"])
    for k in ("pcpt_transformer_out", "gen_transformer_out", "gen_preds", "mvc_output", "cell_emb"):
        np.testing.assert_allclose(np.asarray(o[k]), reference[f"out/{k}"], atol=1e-5, rtol=1e-5)


def test_strict_errors_and_bad_destinations(tmp_path, capsys):
    cli(["convert", str(FIXTURES), str(tmp_path / "torch"), "--to", "torch"])
    from safetensors.numpy import load_file, save_file
    state = load_file(tmp_path / "torch" / "model.safetensors")
    state.pop("decoder.fc.4.bias")
    state["decoder.fc.9.weight"] = np.zeros((1, 64), np.float32)
    save_file(state, tmp_path / "torch" / "model.safetensors")
    with pytest.raises(RiceFMInputError, match="damaged checkpoint: model.safetensors has changed"):
        load_flax_model(tmp_path / "torch")  # its digests no longer match ...
    (tmp_path / "torch" / "checksums.sha256").unlink()  # ... and edited by hand, it is unsealed: strict loading speaks
    with pytest.raises(RiceFMInputError, match=r"missing: decoder.fc.4.bias \| unknown: decoder.fc.9.weight"):
        load_flax_model(tmp_path / "torch")
    assert cli(["convert", str(tmp_path / "torch"), str(tmp_path / "torch"), "--to", "flax"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path), str(tmp_path / "x"), "--to", "flax"]) == 2
    assert "not a riceFM checkpoint" in capsys.readouterr().err
    meta = json.loads((tmp_path / "torch" / "config.json").read_text())
    meta["vocab_sha256"] = "0" * 64
    (tmp_path / "torch" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RiceFMInputError, match="does not match config.json"):
        load_checkpoint(tmp_path / "torch")
