"""Flax models from any checkpoint format (published, torch, Flax) via ``converters``."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import ml_collections

from converters.formats import Checkpoint, load_checkpoint, save_checkpoint
from ricefm.vocab import GeneVocab
from ricefm_jax.model import RiceFM
from ricefm_jax.params import load_state_dict, state_dict


def model_from_checkpoint(ckpt: Checkpoint, path: str | Path, attention: str | None = None,
                          dtype=jnp.float32) -> RiceFM:
    """A Flax model built from a loaded checkpoint's config (with its head, if fine-tuned), strictly loaded."""
    model = RiceFM.from_config(ckpt.model, len(ckpt.vocab), attention=attention, dtype=dtype,
                               n_cls=max(1, ckpt.n_classes))
    load_state_dict(model, ckpt.state, str(path))
    return model


def load_flax_model(path: str | Path, attention: str | None = None, dtype=jnp.float32
                    ) -> tuple[RiceFM, ml_collections.ConfigDict, GeneVocab]:
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, path, attention, dtype), ckpt.model, ckpt.vocab


def save_flax_model(path: str | Path, model: RiceFM, cfg: ml_collections.ConfigDict, vocab: GeneVocab,
                    fmt: str = "flax", data: ml_collections.ConfigDict | None = None) -> None:
    """``model`` in any format; ``data`` (the training data config) records the training settings, as torch's."""
    save_checkpoint(Checkpoint(state_dict(model), cfg, vocab, fmt), path, fmt, data)
