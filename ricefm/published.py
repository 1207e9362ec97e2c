"""The published riceFM checkpoint folder (``best_model.pt`` + ``args.json`` + ``vocab.json``),
backend-neutral parts: reading ``args.json`` into a model config and writing it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

from ricefm.errors import RiceFMInputError
from ricefm.vocab import GeneVocab

WEIGHTS, ARGS, VOCAB = "best_model.pt", "args.json", "vocab.json"

# args.json key -> model config field
_ARG_TO_MODEL = {"embsize": "d_model", "nheads": "n_heads", "nlayers": "n_layers", "d_hid": "d_hid",
                 "dropout": "dropout", "n_bins": "n_bins", "pad_value": "pad_value", "mask_value": "mask_value",
                 "n_layers_cls": "n_layers_cls", "input_emb_style": "input_emb_style"}


def is_published_folder(path: str | Path) -> bool:
    path = Path(path)
    return all((path / f).is_file() for f in (WEIGHTS, ARGS, VOCAB))


def read_published(path: str | Path) -> tuple[dict[str, Any], GeneVocab]:
    path = Path(path)
    missing = [f for f in (WEIGHTS, ARGS, VOCAB) if not (path / f).is_file()]
    if missing:
        raise RiceFMInputError(f"{path}: not a published riceFM checkpoint folder (missing {', '.join(missing)})")
    try:
        args = json.loads((path / ARGS).read_text())
    except json.JSONDecodeError as e:
        raise RiceFMInputError(f"{path / ARGS}: unreadable ({e})") from None
    absent = [k for k in ("embsize", "nheads", "nlayers", "d_hid") if k not in args]
    if absent:
        raise RiceFMInputError(f"{path / ARGS}: lacks {', '.join(absent)}; it is not a riceFM pretraining args dump")
    return args, GeneVocab.load(path / VOCAB)


def model_config_from_args(args: dict[str, Any], base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The base model config with the published architecture fields replaced."""
    model = ml_collections.ConfigDict(base.to_dict())
    for arg, field in _ARG_TO_MODEL.items():
        if arg in args:
            model[field] = type(model[field])(args[arg])
    if "max_seq_len" in args:  # the training length; embedding uses it as its default
        model["max_seq_len"] = int(args["max_seq_len"])
    if args.get("input_emb_style", "continuous") != "continuous":
        raise RiceFMInputError(f"args.json input_emb_style {args['input_emb_style']!r}: only 'continuous' is supported")
    return model


def args_from_config(model: ml_collections.ConfigDict, data: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """An args.json for a published-format export (architecture keys the loaders need)."""
    args = {arg: model[field] for arg, field in _ARG_TO_MODEL.items()}
    args.update(fast_transformer=True, training_tasks="both", input_style="binned", no_cls=True)
    if data is not None:
        args.update(max_seq_len=data.max_seq_len, batch_size=data.batch_size, mask_ratio=list(data.gen_ratios))
    return args
