"""A 2-layer, d_model 64 variant of the base setup for CI, demos and parity tests."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("ricefm_base", Path(__file__).with_name("ricefm_base.py"))
ricefm_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ricefm_base)


def get_config():
    c = ricefm_base.get_config()
    c.model.d_model = 64
    c.model.n_heads = 4
    c.model.n_layers = 2
    c.model.d_hid = 128
    c.data.max_seq_len = 64
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.train.epochs = 1
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    return c
