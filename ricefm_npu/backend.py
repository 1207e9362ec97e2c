"""The torch backend as the registry sees it (``ricefm.backends``); mirrors ``ricefm_jax/backend.py``.

Importing this module imports torch, so a missing ``torch`` extra surfaces in the registry as one
line; the trainer, embedder and fine-tuner are imported only when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections
import torch

from ricefm_npu.attention import IMPLEMENTATIONS

NAME = "torch"
ATTENTION_KERNELS: tuple[str, ...] = IMPLEMENTATIONS


def load_embedder(checkpoint: str | Path, device: str = "auto"):
    from ricefm_npu.embed import TorchEmbedder

    return TorchEmbedder(checkpoint, device=device)


def load_finetuner(checkpoint: str | Path, device: str = "auto"):
    from ricefm_npu.finetune import TorchFinetuner

    return TorchFinetuner(checkpoint, device=device)


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, device: str = "auto", resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    from ricefm_npu.train import train as run

    return run(cfg, workdir, device=device, resume=resume, progress=progress)


def describe_device(device: str = "auto") -> str:
    """The device ``--device`` picks, e.g. ``torch 2.13.0 on cpu``."""
    from ricefm_npu.devices import resolve_device

    return f"torch {torch.__version__} on {resolve_device(device)}"
