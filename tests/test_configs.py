import sys
from unittest import mock

from absl import flags
from ml_collections import config_flags

from conftest import REPO


def _parse(*args):
    # config_flags reads the overrides from sys.argv, as in a real launch
    argv = ["prog", *args]
    with mock.patch.object(sys, "argv", argv):
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", str(REPO / "configs/tiny.py"), "config", flag_values=fv)
        fv(argv)
        return fv.config


def test_base_config_is_the_published_setup():
    c = _parse(f"--config={REPO / 'configs/ricefm_base.py'}")
    assert (c.model.n_layers, c.model.n_heads, c.model.d_model, c.model.d_hid) == (6, 4, 256, 256)
    assert (c.model.dropout, c.model.n_bins, c.model.pad_value, c.model.mask_value) == (0.2, 51, -2.0, -1.0)
    assert (c.data.max_seq_len, c.data.batch_size, tuple(c.data.gen_ratios)) == (1200, 64, (0.25, 0.5, 0.75))
    assert (c.optim.lr, c.optim.schedule, c.optim.warmup_fraction, c.optim.grad_clip_norm) == (1e-3, "cosine", 0.1, 1.0)
    assert (c.train.epochs, c.train.cell_emb_pass_after) == (20, 0)


def test_every_field_overridable_from_command_line():
    c = _parse(f"--config={REPO / 'configs/tiny.py'}", "--config.model.n_layers=3", "--config.optim.lr=0.02",
               "--config.data.gen_ratios=(0.5,)", "--config.train.precision=bf16")
    assert (c.model.n_layers, c.model.d_model, c.optim.lr, tuple(c.data.gen_ratios), c.train.precision) == (
        3, 64, 0.02, (0.5,), "bf16")


def test_every_config_key_is_read_by_the_code():
    """A key nobody reads is a setting that silently does nothing: each must appear in the package code."""
    import re

    c = _parse(f"--config={REPO / 'configs/ricefm_base.py'}")
    code = "\n".join(p.read_text() for pkg in ("ricefm", "ricefm_npu", "ricefm_jax", "converters", "ricefm_cli")
                     for p in (REPO / pkg).rglob("*.py"))
    unread = [f"{section}.{key}" for section in c for key in c[section]
              if not re.search(rf"(\.{key}\b|[\"']{key}[\"'])", code)]
    assert not unread, unread
