"""Every NPU-specific line lives here: importing torch_npu, picking a device, the DDP backend.

Without Ascend CANN, ``import torch_npu`` fails (``ImportError: libhccl.so ...``); with torch-npu
installed, torch itself auto-loads it unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``. Both failures
are turned into one clear message. Nothing is monkey-patched: callers get explicit devices.
"""

from __future__ import annotations

import os

import torch

from ricefm.errors import RiceFMInputError
from ricefm.precision import DEVICE_CHOICES, resolve_precision

_DDP_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def import_torch_npu():
    try:
        import torch_npu  # noqa: F401
    except (ImportError, RuntimeError) as e:
        raise RiceFMInputError(
            f"Ascend NPU support is unavailable: importing torch_npu failed ({e}). Install the torch-npu "
            "release matching your torch and source Ascend CANN's set_env.sh (libhccl.so must be found)") from None
    return torch_npu


def npu_available() -> bool:
    try:
        torch_npu = import_torch_npu()
    except RiceFMInputError:
        return False
    return bool(torch_npu.npu.is_available())


def resolve_device(requested: str = "auto", local_rank: int | None = None) -> torch.device:
    """auto prefers npu, then cuda, then cpu. The index is LOCAL_RANK, never hard-coded."""
    if requested not in DEVICE_CHOICES:
        raise RiceFMInputError(f"--device {requested!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if requested == "tpu":
        raise RiceFMInputError("--device tpu: the torch backend runs on npu, cuda or cpu; use --backend jax for TPUs")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = requested
    if requested == "auto":
        kind = "npu" if npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    elif requested == "npu":
        torch_npu = import_torch_npu()
        if not torch_npu.npu.is_available():
            raise RiceFMInputError("--device npu: torch_npu is installed but no NPU is visible (check ASCEND_RT_VISIBLE_DEVICES)")
    elif requested == "cuda" and not torch.cuda.is_available():
        raise RiceFMInputError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "npu":
        import_torch_npu().npu.set_device(local_rank)
    else:
        torch.cuda.set_device(local_rank)
    return torch.device(kind, local_rank)


def ddp_backend(device: torch.device) -> str:
    return _DDP_BACKENDS[device.type]


def default_attention(device: torch.device, dropout: float = 0.0) -> str:
    """The fastest exact kernel for a device. On CPU, SDPA's fused kernel has no dropout and falls
    back to an unfused path slower than ``math`` (benchmarks/results/torch_train.json)."""
    if device.type == "npu":
        return "npu_fusion"
    return "math" if device.type == "cpu" and dropout > 0 else "sdpa"


def amp_settings(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a grad scaler is needed) for ``train.precision``.

    ``auto`` resolves as for every backend (``ricefm.precision``): fp32 on CPU, bf16 on CUDA,
    fp16 + grad scaler on NPU.
    """
    resolved = resolve_precision(precision, device.type)
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[resolved]


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["device"] = torch.cuda.get_rng_state(device)
    elif device.type == "npu":
        state["device"] = import_torch_npu().npu.get_rng_state(device)
    return state


def set_rng_state(device: torch.device, state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "device" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["device"], device)
    elif "device" in state and device.type == "npu":
        import_torch_npu().npu.set_rng_state(state["device"], device)
