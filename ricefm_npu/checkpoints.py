"""torch models from and to checkpoints; the files themselves are read and written by ``converters``.

The published folder (``best_model.pt`` + ``args.json`` + ``vocab.json``), the native one
(``model.safetensors`` + ``config.json`` + ``vocab.json``) and the Flax one all load into a torch
model here. Loading is strict: unknown, missing or mis-shaped keys are one error that lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import ml_collections
import numpy as np
import torch

from converters.formats import SAFETENSORS, Checkpoint, load_checkpoint, save_checkpoint
from converters.names import check_keys
from ricefm import published
from ricefm.errors import RiceFMInputError
from ricefm.vocab import GeneVocab
from ricefm_npu.model import RiceFM

_SOURCE = {"seed": published.WEIGHTS, "torch": SAFETENSORS}  # the file a strict-load error names


def strict_load(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, source)
    model.load_state_dict(dict(state), strict=True)


def model_from_checkpoint(ckpt: Checkpoint, path: str | Path, attention: str | None = None) -> RiceFM:
    """A torch model built from a loaded checkpoint's config (with its head, if fine-tuned), strictly loaded."""
    model = RiceFM.from_config(ckpt.model, len(ckpt.vocab), attention=attention, n_cls=max(1, ckpt.n_classes))
    source = Path(path) / _SOURCE[ckpt.format] if ckpt.format in _SOURCE else Path(path)
    strict_load(model, {k: torch.from_numpy(v) for k, v in ckpt.state.items()}, str(source))
    return model


def _load(path: str | Path, attention: str | None, fmt: str | None
          ) -> tuple[RiceFM, ml_collections.ConfigDict, GeneVocab]:
    """A model built from the checkpoint's config with its weights; ``fmt`` None = any format."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    if fmt is not None and ckpt.format != fmt:
        raise RiceFMInputError(f"{path}: a {ckpt.format} checkpoint, not {fmt}; use load_torch_checkpoint "
                               "(any format) or `ricefm convert` it")
    return model_from_checkpoint(ckpt, path, attention), ckpt.model, ckpt.vocab


def load_published(path: str | Path, attention: str | None = None
                   ) -> tuple[RiceFM, ml_collections.ConfigDict, GeneVocab]:
    """A model built from ``args.json`` with the published weights, strictly loaded."""
    return _load(path, attention, "seed")


def load_native(path: str | Path, attention: str | None = None) -> tuple[RiceFM, ml_collections.ConfigDict, GeneVocab]:
    """A model from a torch-native folder (``model.safetensors`` + ``config.json`` + ``vocab.json``)."""
    return _load(path, attention, "torch")


def load_torch_checkpoint(path: str | Path, attention: str | None = None
                          ) -> tuple[RiceFM, ml_collections.ConfigDict, GeneVocab]:
    """Any checkpoint format (published, torch native, Flax), detected from its files."""
    return _load(path, attention, None)


def _checkpoint(model: RiceFM, cfg: ml_collections.ConfigDict, vocab: GeneVocab, fmt: str) -> Checkpoint:
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    return Checkpoint({k: np.ascontiguousarray(v) for k, v in state.items()}, cfg, vocab, fmt)


def save_published(path: str | Path, model: RiceFM, cfg: ml_collections.ConfigDict, vocab: GeneVocab,
                   data: ml_collections.ConfigDict | None = None) -> None:
    """The published folder; ``data`` (the training data config) adds its settings to args.json."""
    save_checkpoint(_checkpoint(model, cfg, vocab, "seed"), path, "seed", data)


def save_native(path: str | Path, model: RiceFM, cfg: ml_collections.ConfigDict, vocab: GeneVocab,
                data: ml_collections.ConfigDict | None = None) -> None:
    """The torch-native folder; ``data`` records its ``max_seq_len`` as the model's training length."""
    save_checkpoint(_checkpoint(model, cfg, vocab, "torch"), path, "torch", data)

