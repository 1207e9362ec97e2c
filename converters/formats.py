"""Checkpoint formats and conversion: published (``seed``), torch native, Flax (orbax).

Every format is read into one neutral form — torch-named, torch-layout NumPy arrays, the model
config and the vocabulary — and written from it, so any format converts to any other exactly.

- seed:  ``best_model.pt`` (torch state dict) + ``args.json`` + ``vocab.json`` (needs torch)
- torch: ``model.safetensors`` + ``config.json`` + ``vocab.json``
- flax:  ``params/`` (orbax, Flax layout and paths) + ``config.json`` + ``vocab.json``

Every folder written here also carries ``checksums.sha256`` (``ricefm.integrity``), which loading checks.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_collections
import numpy as np

from converters.names import flax_path, to_flax_layout, to_torch_layout, torch_key
from ricefm import published
from ricefm.atomic import staged_dir, write_json_atomic
from ricefm.environment import check_torch_numpy
from ricefm.errors import RiceFMInputError
from ricefm.integrity import check_sealed, seal
from ricefm.init import parameter_shapes
from ricefm.vocab import GeneVocab

FORMATS = ("seed", "torch", "flax")
TORCH_FORMAT, FLAX_FORMAT = "ricefm-torch", "ricefm-flax"
CONFIG, SAFETENSORS, PARAMS = "config.json", "model.safetensors", "params"


@dataclass
class Checkpoint:
    state: dict[str, np.ndarray]  # torch names and layout
    model: ml_collections.ConfigDict
    vocab: GeneVocab
    format: str
    # a fine-tuned classifier's record: class_names (in head order), label_key, settings, validation
    # metrics; args.json / config.json key "finetune" in every format
    finetune: dict | None = None

    @property
    def n_classes(self) -> int:
        """Rows of the ``cls_decoder`` head (0: a pretrained model without one)."""
        head = self.state.get("cls_decoder.out_layer.weight")
        return 0 if head is None else int(head.shape[0])


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if published.is_published_folder(path):
        return "seed"
    if (path / CONFIG).is_file():
        fmt = json.loads((path / CONFIG).read_text()).get("format")
        if fmt == TORCH_FORMAT and (path / SAFETENSORS).is_file():
            return "torch"
        if fmt == FLAX_FORMAT and (path / PARAMS).is_dir():
            return "flax"
    raise RiceFMInputError(
        f"{path}: not a riceFM checkpoint (published: best_model.pt + args.json + vocab.json; torch: "
        f"{SAFETENSORS} + {CONFIG} + vocab.json; flax: {PARAMS}/ + {CONFIG} + vocab.json)")


def _base_model_config() -> ml_collections.ConfigDict:
    from ricefm_configs import ricefm_base

    return ricefm_base.get_config().model


def _check_finetune(record: dict | None, state: dict[str, np.ndarray], source: Path) -> dict | None:
    head = state.get("cls_decoder.out_layer.weight")
    if record is None:
        return None
    names = record.get("class_names")
    if not isinstance(names, list) or head is None or len(names) != head.shape[0]:
        raise RiceFMInputError(f"{source}: its finetune record names {len(names) if isinstance(names, list) else 'no'} "
                               f"classes but the cls_decoder head has {0 if head is None else head.shape[0]}; "
                               "the checkpoint is inconsistent: fine-tune again")
    return record


def _read_meta(path: Path, fmt: str) -> tuple[ml_collections.ConfigDict, GeneVocab]:
    try:
        meta = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise RiceFMInputError(f"{path / CONFIG}: unreadable ({e}); restore the checkpoint from a copy") from None
    vocab = GeneVocab.load(path / published.VOCAB)
    if vocab.sha256() != meta.get("vocab_sha256"):
        raise RiceFMInputError(f"{path}: vocab.json does not match {CONFIG}'s vocab_sha256")
    return ml_collections.ConfigDict(meta["model"]), vocab


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Any format, detected; its files are checked against ``checksums.sha256`` first (when it has
    one: folders written here do), and a file the format's reader cannot parse is one line."""
    path = Path(path)
    fmt = detect_format(path)
    check_sealed(path)
    try:
        ckpt = _read(path, fmt)
    except (RiceFMInputError, ImportError):
        raise
    except Exception as e:  # torch.load, safetensors and orbax each raise their own types for a damaged file
        what = {"seed": published.WEIGHTS, "torch": SAFETENSORS, "flax": PARAMS + "/"}[fmt]
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RiceFMInputError(f"{path / what}: unreadable {fmt} checkpoint ({type(e).__name__}: {reason}); "
                               "it is truncated or damaged: restore it from a copy") from None
    meta_file = path / (published.ARGS if fmt == "seed" else CONFIG)
    ckpt.finetune = _check_finetune(json.loads(meta_file.read_text()).get("finetune"), ckpt.state, meta_file)
    return ckpt


def load_finetuned(path: str | Path) -> Checkpoint:
    """A checkpoint made by ``ricefm finetune`` (a ``cls_decoder`` head and its class names), any format."""
    ckpt = load_checkpoint(path)
    if ckpt.finetune is None:
        raise RiceFMInputError(f"{path}: not a fine-tuned checkpoint (no cls_decoder head and class names); "
                               "make one with `ricefm finetune`")
    return ckpt


def _read(path: Path, fmt: str) -> Checkpoint:
    if fmt == "seed":
        try:
            import torch
        except ImportError:
            raise RiceFMInputError(f"{path}: reading best_model.pt needs torch (pip install torch)") from None
        check_torch_numpy(torch.__version__)
        args, vocab = published.read_published(path)
        model = published.model_config_from_args(args, _base_model_config())
        sd = torch.load(path / published.WEIGHTS, map_location="cpu", weights_only=True)
        return Checkpoint({k: v.numpy() for k, v in sd.items()}, model, vocab, fmt)
    model, vocab = _read_meta(path, fmt)
    if fmt == "torch":
        from safetensors.numpy import load_file

        return Checkpoint(load_file(path / SAFETENSORS), model, vocab, fmt)
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore((path / PARAMS).resolve())
    state = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*prefix, int(k) if str(k).isdigit() else k))
        else:
            state[torch_key(prefix)] = to_torch_layout(prefix, np.asarray(node))

    walk(tree, ())
    return Checkpoint(state, model, vocab, fmt)


def _write_meta(path: Path, ckpt: Checkpoint, fmt_name: str) -> None:
    meta = {"format": fmt_name, "vocab_size": len(ckpt.vocab), "vocab_sha256": ckpt.vocab.sha256(),
            "model": ckpt.model.to_dict()}
    if ckpt.finetune is not None:
        meta.update(n_cls=ckpt.n_classes, finetune=ckpt.finetune)
    write_json_atomic(path / CONFIG, meta)
    ckpt.vocab.save(path / published.VOCAB)


def _published_order(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The state in the published state-dict order (``ricefm.init.parameter_shapes``); a state that
    is not the published model's keeps its own order (strict loading reports it)."""
    head = ckpt.state.get("cls_decoder.out_layer.weight")
    order = list(parameter_shapes(ckpt.model, len(ckpt.vocab), 1 if head is None else int(head.shape[0])))
    return {k: ckpt.state[k] for k in order} if set(order) == set(ckpt.state) else ckpt.state


def write_checkpoint(ckpt: Checkpoint, folder: str | Path, fmt: str,
                     data: ml_collections.ConfigDict | None = None) -> None:
    """Write ``ckpt`` as ``fmt`` into ``folder`` (created if absent, written in place).

    ``data`` is the training data config, when the weights come from a training run: its
    ``max_seq_len`` is recorded as the training length (and, published, its batch settings in args.json).
    """
    if fmt not in FORMATS:
        raise RiceFMInputError(f"--to {fmt!r}: choose one of {', '.join(FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if data is not None:
        model = ml_collections.ConfigDict(ckpt.model.to_dict())
        model["max_seq_len"] = int(data.max_seq_len)
        ckpt = Checkpoint(ckpt.state, model, ckpt.vocab, ckpt.format, ckpt.finetune)
    if fmt == "seed":
        import collections

        import torch

        check_torch_numpy(torch.__version__)
        state = _published_order(ckpt)
        sd = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items())
        torch.save(sd, folder / published.WEIGHTS)
        args = published.args_from_config(ckpt.model, data)
        if ckpt.finetune is not None:
            args.update(n_cls=ckpt.n_classes, finetune=ckpt.finetune)
        write_json_atomic(folder / published.ARGS, args)
        ckpt.vocab.save(folder / published.VOCAB)
    elif fmt == "torch":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in ckpt.state.items()}, folder / SAFETENSORS)
        _write_meta(folder, ckpt, TORCH_FORMAT)
    else:
        import orbax.checkpoint as ocp

        tree: dict = {}
        for key, value in ckpt.state.items():
            p = flax_path(key)
            node = tree
            for part in p[:-1]:
                node = node.setdefault(str(part), {})
            node[p[-1]] = to_flax_layout(p, np.asarray(value))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((folder / PARAMS).resolve(), tree)
        checkpointer.wait_until_finished()
        _write_meta(folder, ckpt, FLAX_FORMAT)
    seal(folder)


def check_destination(path: str | Path) -> None:
    """A new checkpoint can go to ``path``: absent or an empty folder, in a writable place (checked
    before long work such as fine-tuning, and again when writing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RiceFMInputError(f"{path}: is a file; a checkpoint is a folder: choose a new destination")
    if path.exists() and any(path.iterdir()):
        raise RiceFMInputError(f"{path}: exists and is not empty; choose a new destination")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    try:
        probe = tempfile.TemporaryFile(dir=parent)
        probe.close()
    except OSError as e:
        raise RiceFMInputError(f"{path}: cannot write there ({e.strerror}); choose a writable destination") from None


def save_checkpoint(ckpt: Checkpoint, path: str | Path, fmt: str,
                    data: ml_collections.ConfigDict | None = None) -> None:
    """Write ``ckpt`` as ``fmt`` to ``path``, a new or empty folder, swapped in only when complete."""
    if fmt not in FORMATS:
        raise RiceFMInputError(f"--to {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_destination(path)
    with staged_dir(Path(path)) as folder:
        write_checkpoint(ckpt, folder, fmt, data)


def convert(src: str | Path, dst: str | Path, to: str) -> Checkpoint:
    """``ricefm convert``: any format to ``to``, exactly (names and layout by ``converters.names``)."""
    ckpt = load_checkpoint(src)
    save_checkpoint(ckpt, dst, to)
    return ckpt
