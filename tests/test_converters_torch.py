"""The converters' torch side (no JAX needed; also run on the torch 2.1 lane): the published and torch-native
formats, bit-exact between them, and the writers the torch trainer uses."""

import json

import numpy as np
import pytest
import torch

from converters.formats import detect_format, load_checkpoint
from ricefm.errors import RiceFMInputError
from ricefm_cli.cli import main as cli
from ricefm_npu.checkpoints import load_published, load_torch_checkpoint, save_native, save_published

from conftest import FIXTURES


def states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_seed_to_torch_to_seed_is_bit_exact(tmp_path):
    assert cli(["convert", str(FIXTURES), str(tmp_path / "torch"), "--to", "torch"]) == 0
    assert cli(["convert", str(tmp_path / "torch"), str(tmp_path / "seed"), "--to", "seed"]) == 0
    assert detect_format(tmp_path / "torch") == "torch" and detect_format(tmp_path / "seed") == "seed"
    original = load_checkpoint(FIXTURES)
    states_equal(load_checkpoint(tmp_path / "seed").state, original.state)
    assert list(torch.load(tmp_path / "seed" / "best_model.pt", weights_only=True)) == list(original.state)
    model, _, vocab = load_torch_checkpoint(tmp_path / "torch")
    assert len(vocab) == len(original.vocab)
    states_equal({k: v.numpy() for k, v in model.state_dict().items()}, original.state)


def test_trainer_writers_fill_an_empty_staging_folder_and_record_the_data_settings(tmp_path):
    import ml_collections

    model, cfg, vocab = load_published(FIXTURES)
    data = ml_collections.ConfigDict({"max_seq_len": 96, "batch_size": 8, "gen_ratios": (0.25, 0.5)})
    for name in ("native", "pub"):
        (tmp_path / name).mkdir()  # the trainers hand over an existing, empty staging folder
    save_native(tmp_path / "native", model, cfg, vocab, data)
    save_published(tmp_path / "pub", model, cfg, vocab, data)
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model"]["max_seq_len"] == 96
    args = json.loads((tmp_path / "pub" / "args.json").read_text())
    assert (args["max_seq_len"], args["batch_size"], args["mask_ratio"]) == (96, 8, [0.25, 0.5])
    assert list(torch.load(tmp_path / "pub" / "best_model.pt", weights_only=True)) == list(model.state_dict())
    states_equal(load_checkpoint(tmp_path / "native").state, load_checkpoint(tmp_path / "pub").state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native", "pub"]  # no staging leftovers
    with pytest.raises(RiceFMInputError, match="a torch checkpoint, not seed"):
        load_published(tmp_path / "native")
