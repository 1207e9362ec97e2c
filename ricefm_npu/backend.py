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


def load_classifier(checkpoint: str | Path, device: str = "auto"):
    from ricefm_npu.annotate import TorchClassifier

    return TorchClassifier(checkpoint, device=device)


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, device: str = "auto", resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    from ricefm_npu.train import train as run

    return run(cfg, workdir, device=device, resume=resume, progress=progress)


def describe_device(device: str = "auto") -> str:
    """The device ``--device`` picks, e.g. ``torch 2.13.0 on cpu``."""
    from ricefm_npu.devices import resolve_device

    return f"torch {torch.__version__} on {resolve_device(device)}"


def doctor(device: str = "auto") -> list[tuple[str, str]]:
    """(label, finding) lines for ``ricefm doctor``: versions, accelerators, and what training and
    embedding would use on the device ``--device`` picks. Never imports torch_npu without CANN."""
    from ricefm.precision import resolve_precision
    from ricefm_configs import ricefm_base
    from ricefm_npu import devices

    lines = [("torch", f"{torch.__version__} (CUDA build {torch.version.cuda})" if torch.version.cuda
              else f"{torch.__version__} (CPU build)")]
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        lines.append(("CUDA", f"{torch.cuda.device_count()} device(s): {', '.join(names)}"))
    else:
        lines.append(("CUDA", "no CUDA device visible to torch"))
    npu = devices.npu_report()
    lines.append(("torch-npu", npu["torch_npu"] or "not installed"))
    lines.append(("CANN", f"{npu['cann_version']} at {npu['cann_home']}" + (
        "" if npu["libhccl_visible"] else " (libhccl.so not on LD_LIBRARY_PATH)") if npu["cann_home"] else "not found"))
    lines.append(("NPU", f"{npu['npu_count']} device(s)" if npu["npu_count"] else "none usable"))
    try:
        dev = devices.resolve_device(device, 0)
    except Exception as e:  # the finding is the message: doctor reports, it does not stop
        lines.append(("torch run", f"--device {device}: {e}"))
        return lines
    dropout = float(ricefm_base.get_config().model.dropout)
    train_attention = devices.default_attention(dev, dropout)
    lines.append(("torch run", f"--device {device} -> {dev}; training: {train_attention} attention, "
                               f"{resolve_precision('auto', dev.type)} (precision=auto, dropout {dropout}); "
                               f"embedding: {devices.default_attention(dev)} attention, fp32"))
    lines.append(("NPU run needs", "; ".join(npu["missing"]) if npu["missing"] else "nothing: ready"))
    return lines
