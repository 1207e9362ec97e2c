"""The backend registry: names only, one line for a missing extra, mirrored backend modules, and
``--device`` honoured by both backends."""

import jax
import numpy as np
import pytest

from ricefm import backends
from ricefm.errors import RiceFMInputError

from conftest import FIXTURES

PUBLIC = ("NAME", "ATTENTION_KERNELS", "load_embedder", "load_finetuner", "train", "describe_device")


def test_unknown_backend_lists_the_choices():
    with pytest.raises(RiceFMInputError, match=r"backend 'tf': choose one of torch, jax"):
        backends.get_backend("tf")


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "jax", "ricefm_absent_backend_module")
    with pytest.raises(RiceFMInputError, match=r"needs the jax extra \(pip install 'ricefm\[jax\]'\)"):
        backends.get_backend("jax")


def test_backend_modules_mirror_each_other():
    mods = {name: backends.get_backend(name) for name in backends.BACKENDS}
    for name, mod in mods.items():
        assert mod.NAME == name and all(hasattr(mod, attr) for attr in PUBLIC), name
        assert "math" in mod.ATTENTION_KERNELS
        assert mod.describe_device("cpu").endswith(("on cpu", "on cpu:0"))
    with pytest.raises(RiceFMInputError, match="--device npu: JAX has no Ascend backend"):
        mods["jax"].describe_device("npu")
    with pytest.raises(RiceFMInputError, match="--device tpu: the torch backend"):
        mods["torch"].describe_device("tpu")


def test_jax_embedder_and_finetuner_run_on_the_requested_device():
    jax_backend = backends.get_backend("jax")
    embedder = jax_backend.load_embedder(FIXTURES, device="cpu")
    assert embedder.device == jax.devices("cpu")[0] and embedder.description.endswith("on cpu:0")
    leaves = jax.tree_util.tree_leaves(embedder.model)
    assert leaves and all(leaf.devices() == {embedder.device} for leaf in leaves if hasattr(leaf, "devices"))
    batch = {"gene_ids": np.zeros((2, 4), np.int32), "values": np.zeros((2, 4), np.float32),
             "key_padding_mask": np.zeros((2, 4), bool), "mod_types": np.zeros((2,), np.int64)}
    assert embedder.embed(batch).shape == (2, 64)
    assert jax_backend.load_finetuner(FIXTURES, device="cpu").device == jax.devices("cpu")[0]
    if jax.default_backend() == "cpu":  # no GPU here: asking for one is a clear error, not a silent CPU run
        with pytest.raises(RiceFMInputError, match="JAX sees no cuda device"):
            jax_backend.load_embedder(FIXTURES, device="cuda")


def test_backend_train_takes_the_trainers_arguments():
    import inspect

    from ricefm_jax.train import train as jax_train
    from ricefm_npu.train import train as torch_train

    for name, trainer in (("jax", jax_train), ("torch", torch_train)):
        wrapper = backends.get_backend(name).train
        assert list(inspect.signature(wrapper).parameters) == list(inspect.signature(trainer).parameters), name
