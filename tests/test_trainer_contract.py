"""One trainer contract for both backends: the same initial weights, flags, validation, metrics and precision."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from converters.formats import load_checkpoint
from ricefm import training
from ricefm.errors import RiceFMInputError
from ricefm.init import initial_state, parameter_shapes
from ricefm.precision import resolve_precision
from ricefm.shards.build import build_dataset
from ricefm_configs import ricefm_base, tiny
from ricefm_jax import devices as jax_devices
from ricefm_jax.model import RiceFM as FlaxRiceFM
from ricefm_jax.params import state_dict as flax_state_dict
from ricefm_jax.train import JaxSteps
from ricefm_npu import devices as torch_devices
from ricefm_npu.model import RiceFM as TorchRiceFM
from ricefm_npu.train import TorchSteps, _Distributed

from conftest import REPO


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("contract") / "data"
    build_dataset([REPO / "ricefm/resources/rice_root_SRP309176_2k.h5ad"], out, progress=False)
    return out


def contract_config(data_dir):
    cfg = tiny.get_config()
    cfg.data.data_dir = str(data_dir)
    cfg.model.dropout = 0.0
    cfg.train.precision = "fp32"
    cfg.train.max_steps = 5
    return cfg


def test_initial_weights_follow_the_published_laws():
    cfg = ricefm_base.get_config().model
    s = initial_state(cfg, 1000, seed=0)
    assert list(s) == list(TorchRiceFM.from_config(cfg, 1000).state_dict())  # published key order
    assert all(v.dtype == np.float32 for v in s.values())
    emb = s["encoder.embedding.weight"]
    assert emb.min() >= -0.1 and emb.max() < 0.1 and abs(emb.mean()) < 2e-3  # U(-0.1, 0.1), 256k draws
    for k in ("flag_encoder.weight", "mod_encoder.embedding.weight"):  # N(0, 1), 512 draws: mean sd 0.044
        assert abs(s[k].mean()) < 0.2 and 0.85 < s[k].std() < 1.15, k
    w = s["transformer_encoder.layers.0.linear2.weight"]  # fan_in 256: U(-1/16, 1/16)
    assert w.min() >= -1 / 16 and w.max() <= 1 / 16 and np.isclose(w.std(), 1 / 16 / np.sqrt(3), rtol=0.02)
    b = s["value_encoder.linear1.bias"]  # fan_in 1: U(-1, 1)
    assert b.min() >= -1 and b.max() <= 1 and b.max() > 0.9
    assert (s["encoder.enc_norm.weight"] == 1).all() and (s["transformer_encoder.layers.5.norm2.bias"] == 0).all()
    again, other = initial_state(cfg, 1000, seed=0), initial_state(cfg, 1000, seed=1)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert not np.array_equal(s["decoder.fc.0.weight"], other["decoder.fc.0.weight"])
    with_head = initial_state(cfg, 1000, seed=0, n_cls=5)  # a head adds tensors and changes none of the others
    assert set(with_head) - set(s) == {k for k in parameter_shapes(cfg, 1000, 5) if k.startswith("cls_decoder.")}
    assert all(np.array_equal(s[k], with_head[k]) for k in s)


def _plan(cfg, workdir):
    return training.plan(cfg, workdir, rank=0, world_size=1, batch_per_process=int(cfg.data.batch_size))


def test_both_backends_start_from_the_same_weights_and_validate_alike(data_dir, tmp_path):
    cfg = contract_config(data_dir)
    p = _plan(cfg, tmp_path / "t")
    torch_steps = TorchSteps(p, _Distributed("cpu"))
    jax_steps = JaxSteps(_plan(cfg, tmp_path / "j"), jax.devices("cpu"))
    try:
        want = p.initial_state()
        t = {k: v.numpy() for k, v in torch_steps.model.state_dict().items()}
        from flax import nnx

        holder = FlaxRiceFM.from_config(cfg.model, len(p.vocab))
        nnx.update(holder, jax.device_get(jax_steps.params))
        j = flax_state_dict(holder)
        assert t.keys() == j.keys() == want.keys()
        assert all(np.array_equal(t[k], want[k]) and np.array_equal(j[k], want[k]) for k in want)  # bit-identical
        vt, vj = training.validate(p, torch_steps), training.validate(p, jax_steps)
        # same weights, same batches: fp32 forwards in another summation order, DESIGN.md outputs 1e-5 rel
        for k in training.LOSS_NAMES:
            assert abs(vt[k] - vj[k]) <= 1e-5 * abs(vt[k]), (k, vt[k], vj[k])
    finally:
        jax_steps.close()


def test_validation_batches_cover_every_cell_once_whatever_the_process_count(data_dir, tmp_path):
    cfg = contract_config(data_dir)
    cfg.data.eval_batch_size = 7  # 200 validation cells: 28 whole batches and one of 4
    p = _plan(cfg, tmp_path)
    one = list(training.validation_batches(p))
    assert [len(b["cell_index"]) for b in one] == [7] * 28 + [4]
    assert sorted(np.concatenate([b["cell_index"] for b in one])) == sorted(p.data.valid_cells)
    halves = [list(training.validation_batches(training.Plan(**{**p.__dict__, "rank": r, "world_size": 2})))
              for r in (0, 1)]
    assert [len(h) for h in halves] == [15, 14]
    mixed = [halves[b % 2][b // 2] for b in range(len(one))]  # process r takes batches r, r + 2, ...
    for a, b in zip(one, mixed):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_precision_auto_is_one_table():
    assert [resolve_precision("auto", c) for c in ("cpu", "cuda", "tpu", "npu")] == ["fp32", "bf16", "bf16", "fp16"]
    assert torch_devices.amp_settings("auto", torch.device("cpu")) == (None, False)
    assert jax_devices.compute_dtype("auto", jax.devices("cpu")[0]) == jax.numpy.float32
    for bad in (lambda: torch_devices.amp_settings("fp16", torch.device("cpu")),
                lambda: jax_devices.compute_dtype("fp16", jax.devices("cpu")[0])):
        with pytest.raises(RiceFMInputError, match="fp16 needs an NPU or CUDA device"):
            bad()
    with pytest.raises(RiceFMInputError, match="choose one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", "cpu")


def test_both_entry_points_take_the_same_flags_and_train_alike_from_scratch(data_dir, tmp_path, capsys):
    flags = ["--config", str(REPO / "configs/tiny.py"), "--data", str(data_dir), "--device", "cpu",
             "--config.model.dropout=0", "--config.train.precision=fp32", "--config.train.max_steps=5"]
    logs = {}
    for module in ("ricefm_npu.train", "ricefm_jax.train"):
        work = tmp_path / module
        r = subprocess.run([sys.executable, "-m", module, *flags, "--workdir", str(work)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "done: 5/5 steps" in r.stdout
        logs[module] = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    t, j = (load_checkpoint(tmp_path / m / "best") for m in ("ricefm_npu.train", "ricefm_jax.train"))
    assert t.format == j.format == "seed"
    rel = {k: float(np.linalg.norm(t.state[k] - j.state[k]) / max(np.linalg.norm(t.state[k]), 1e-12))
           for k in t.state}
    with capsys.disabled():
        print(f"\nfrom scratch, 5 steps, both CLIs: worst per-tensor relative norm difference {max(rel.values()):.2e} "
              f"({max(rel, key=rel.get)})")
    assert max(rel.values()) <= 1e-3  # the bound for whole-tensor agreement after 5 steps
    a, b = logs["ricefm_npu.train"][-1], logs["ricefm_jax.train"][-1]
    assert a.keys() == b.keys() == {"step", "loss_total", "loss_mse", "loss_mvc", "loss_gen", "lr", "grad_norm",
                                    "cells_per_s", "tokens_per_s", "padding_fraction"}
    assert a["lr"] == b["lr"] and a["step"] == b["step"] == 5
    args = [json.loads((tmp_path / m / "best/args.json").read_text()) for m in ("ricefm_npu.train", "ricefm_jax.train")]
    assert args[0] == args[1] and args[0]["max_seq_len"] == 64  # the same published export from both


@pytest.mark.parametrize("field, value, message", [
    ("train.max_steps", -5, "train.max_steps=-5: must be at least 0"),
    ("data.max_seq_len", 1, "data.max_seq_len=1: leaves no gen token at gen ratio 0.25; use at least 5"),
    ("data.max_seq_len", 4, "data.max_seq_len=4: leaves no gen token at gen ratio 0.25; use at least 5"),
    ("data.batch_size", 0, "data.batch_size=0: must be at least 1"),
    ("data.gen_ratios", (0.5, 1.0), r"gen_ratios=\(0.5, 1.0\): fractions strictly between 0 and 1"),
    ("train.checkpoint_every", 0, "checkpoint_every=0: must be at least 1"),
    ("train.host_memory", "never", "train.host_memory='never': choose one of keep, release"),
])
def test_settings_that_cannot_train_are_refused_before_any_work(field, value, message):
    cfg = tiny.get_config()
    section, key = field.split(".")
    cfg[section][key] = value
    with pytest.raises(RiceFMInputError, match=message):
        training.check_settings(cfg)


def test_settings_at_their_limits_are_accepted():
    cfg = tiny.get_config()
    cfg.data.max_seq_len, cfg.train.epochs, cfg.train.max_steps = 5, 0, 3  # epochs unused when max_steps is set
    training.check_settings(cfg)
