"""The JAX backend as the registry sees it (``ricefm.backends``); mirrors ``ricefm_npu/backend.py``.

Importing this module imports jax, so a missing ``jax`` extra surfaces in the registry as one line;
the trainer, embedder and fine-tuner are imported only when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections

from ricefm_jax.attention import IMPLEMENTATIONS

NAME = "jax"
ATTENTION_KERNELS: tuple[str, ...] = IMPLEMENTATIONS


def load_embedder(checkpoint: str | Path, device: str = "auto"):
    from ricefm_jax.embed import JaxEmbedder

    return JaxEmbedder(checkpoint, device=device)


def load_finetuner(checkpoint: str | Path, device: str = "auto"):
    from ricefm_jax.finetune import JaxFinetuner

    return JaxFinetuner(checkpoint, device=device)


def load_classifier(checkpoint: str | Path, device: str = "auto"):
    from ricefm_jax.annotate import JaxClassifier

    return JaxClassifier(checkpoint, device=device)


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, device: str = "auto", resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    from ricefm_jax.train import train as run

    return run(cfg, workdir, device=device, resume=resume, progress=progress)


def describe_device(device: str = "auto") -> str:
    """The device ``--device`` picks (the first of the data-parallel set), e.g. ``jax 0.7.0 on cpu:0``."""
    from ricefm_jax.devices import resolve_devices

    return device_description(resolve_devices(device)[0])


def device_description(device: jax.Device) -> str:
    return f"jax {jax.__version__} on {device.platform}:{device.id}"


def doctor(device: str = "auto") -> list[tuple[str, str]]:
    """(label, finding) lines for ``ricefm doctor``: JAX's platform and devices, and what training and
    embedding would use on the device ``--device`` picks."""
    from ricefm_jax.devices import compute_dtype, resolve_devices

    devices = jax.devices()
    lines = [("jax", f"{jax.__version__}, default platform {jax.default_backend()}, {len(devices)} device(s): "
                     + ", ".join(sorted({d.device_kind for d in devices})))]
    try:
        chosen = resolve_devices(device)
        dtype = compute_dtype("auto", chosen[0])
    except Exception as e:  # the finding is the message: doctor reports, it does not stop
        lines.append(("jax run", f"--device {device}: {e}"))
        return lines
    lines.append(("jax run", f"--device {device} -> {len(chosen)} {chosen[0].platform} device(s); training: math "
                             f"attention, {'bf16' if dtype == jax.numpy.bfloat16 else 'fp32'} (precision=auto); embedding: "
                             "dot_product attention, fp32"))
    return lines
