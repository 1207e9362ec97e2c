"""torch checkpoints: the published folder (``best_model.pt`` + ``args.json`` + ``vocab.json``) and
the native one (``model.safetensors`` + ``config.json`` + ``vocab.json``). Loading is strict:
unknown, missing or mis-shaped keys are one error that lists them all."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import ml_collections
import torch

from ricefm import published
from ricefm.atomic import write_json_atomic
from ricefm.errors import RiceFMInputError
from ricefm.vocab import GeneVocab
from ricefm_npu.model import RiceFM

NATIVE_WEIGHTS, NATIVE_CONFIG = "model.safetensors", "config.json"
NATIVE_FORMAT = "ricefm-torch"


def base_model_config() -> ml_collections.ConfigDict:
    from ricefm_configs import ricefm_base

    return ricefm_base.get_config().model


def strict_load(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unknown = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if tuple(state[k].shape) != tuple(own[k].shape)]
    problems = ([f"missing: {', '.join(missing)}"] if missing else []) + (
        [f"unknown: {', '.join(unknown)}"] if unknown else []) + ([f"mis-shaped: {'; '.join(shapes)}"] if shapes else [])
    if problems:
        raise RiceFMInputError(f"{source}: checkpoint does not fit the model ({' | '.join(problems)})")
    model.load_state_dict(dict(state), strict=True)


def load_published(path: str | Path, attention: str | None = None
                   ) -> tuple[RiceFM, ml_collections.ConfigDict, GeneVocab]:
    """A model built from ``args.json`` with the published weights, strictly loaded."""
    path = Path(path)
    args, vocab = published.read_published(path)
    cfg = published.model_config_from_args(args, base_model_config())
    model = RiceFM.from_config(cfg, len(vocab), attention=attention)
    state = torch.load(path / published.WEIGHTS, map_location="cpu", weights_only=True)
    strict_load(model, state, str(path / published.WEIGHTS))
    return model, cfg, vocab


def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_published(path: str | Path, model: RiceFM, cfg: ml_collections.ConfigDict, vocab: GeneVocab,
                   data: ml_collections.ConfigDict | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path / published.WEIGHTS)
    write_json_atomic(path / published.ARGS, published.args_from_config(cfg, data))
    vocab.save(path / published.VOCAB)


def save_native(path: str | Path, model: RiceFM, cfg: ml_collections.ConfigDict, vocab: GeneVocab,
                data: ml_collections.ConfigDict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model.", dir=path)
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path / NATIVE_WEIGHTS)
    model_cfg = cfg.to_dict()
    if data is not None:
        model_cfg["max_seq_len"] = int(data.max_seq_len)
    write_json_atomic(path / NATIVE_CONFIG, {"format": NATIVE_FORMAT, "vocab_size": len(vocab),
                                             "vocab_sha256": vocab.sha256(), "model": model_cfg})
    vocab.save(path / published.VOCAB)


def is_native_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / NATIVE_WEIGHTS).is_file() and (path / NATIVE_CONFIG).is_file()


def load_native(path: str | Path, attention: str | None = None) -> tuple[RiceFM, ml_collections.ConfigDict, GeneVocab]:
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / NATIVE_CONFIG).read_text())
    if meta.get("format") != NATIVE_FORMAT:
        raise RiceFMInputError(f"{path / NATIVE_CONFIG}: format {meta.get('format')!r} is not {NATIVE_FORMAT}")
    vocab = GeneVocab.load(path / published.VOCAB)
    if vocab.sha256() != meta["vocab_sha256"]:
        raise RiceFMInputError(f"{path}: vocab.json does not match config.json's vocab_sha256")
    cfg = ml_collections.ConfigDict(meta["model"])
    model = RiceFM.from_config(cfg, len(vocab), attention=attention)
    strict_load(model, load_file(path / NATIVE_WEIGHTS), str(path / NATIVE_WEIGHTS))
    return model, cfg, vocab


def load_torch_checkpoint(path: str | Path, attention: str | None = None
                          ) -> tuple[RiceFM, ml_collections.ConfigDict, GeneVocab]:
    """Any checkpoint format (published, torch native, Flax), detected from its files."""
    if is_native_folder(path):
        return load_native(path, attention)
    if published.is_published_folder(path):
        return load_published(path, attention)
    from converters.formats import load_checkpoint  # a Flax folder, or a clear error naming the formats

    ckpt = load_checkpoint(path)
    model = RiceFM.from_config(ckpt.model, len(ckpt.vocab), attention=attention)
    strict_load(model, {k: torch.from_numpy(v) for k, v in ckpt.state.items()}, str(path))
    return model, ckpt.model, ckpt.vocab
