"""Every NPU-specific line lives here: importing torch_npu, picking a device, the DDP backend.

Without Ascend CANN, ``import torch_npu`` fails (``ImportError: libhccl.so ...``); with torch-npu
installed, torch itself auto-loads it unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``. Both failures
are turned into one clear message. Nothing is monkey-patched: callers get explicit devices.
"""

from __future__ import annotations

import os
import sys

import torch

from ricefm import environment
from ricefm.errors import RiceFMInputError
from ricefm.precision import DEVICE_CHOICES, resolve_precision

_DDP_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def import_torch_npu():
    if "torch_npu" not in sys.modules and not cann_present():  # the import could only fail, inside libhccl.so
        raise RiceFMInputError("Ascend NPU support is unavailable: Ascend CANN was not found (no ASCEND_TOOLKIT_HOME, "
                               f"no {environment.DEFAULT_CANN_HOME}, no libhccl.so on LD_LIBRARY_PATH). Install CANN "
                               "and source its set_env.sh, then the torch-npu release matching your torch")
    try:
        import torch_npu  # noqa: F401
    except (ImportError, RuntimeError) as e:
        raise RiceFMInputError(
            f"Ascend NPU support is unavailable: importing torch_npu failed ({e}). Install the torch-npu "
            "release matching your torch and source Ascend CANN's set_env.sh (libhccl.so must be found)") from None
    return torch_npu


def torch_npu_version() -> str | None:
    """torch-npu's installed version, read from its metadata (no import)."""
    return environment.package_version("torch-npu") or environment.package_version("torch_npu")


def cann_present() -> bool:
    """Whether Ascend CANN is installed or its libraries are on the loader path."""
    return environment.cann_home() is not None or environment.cann_libraries_visible()


def npu_available() -> bool:
    """An NPU is usable. Without torch-npu or without CANN, nothing is imported: the import could only fail."""
    if "torch_npu" not in sys.modules and (torch_npu_version() is None or not cann_present()):
        return False
    try:
        torch_npu = import_torch_npu()
    except RiceFMInputError:
        return False
    return bool(torch_npu.npu.is_available())


def npu_report() -> dict:
    """What this machine offers an NPU run, and what it lacks (for ``ricefm doctor``)."""
    home = environment.cann_home()
    report = {"torch_npu": torch_npu_version(), "cann_home": str(home) if home else None,
              "cann_version": environment.cann_version(home) if home else None,
              "libhccl_visible": environment.cann_libraries_visible(), "npu_count": 0, "missing": []}
    missing = report["missing"]
    if report["torch_npu"] is None and "torch_npu" not in sys.modules:
        missing.append(f"torch-npu (pip install torch-npu=={torch.__version__.split('+')[0]}, the release for "
                       "this torch)")
    elif report["torch_npu"] and report["torch_npu"].split(".post")[0].split("rc")[0] != torch.__version__.split("+")[0]:
        missing.append(f"a torch-npu for torch {torch.__version__} (installed: torch-npu {report['torch_npu']}, "
                       "each torch-npu release pins its torch)")
    if home is None:
        missing.append("Ascend CANN (install the toolkit; set ASCEND_TOOLKIT_HOME or source its set_env.sh)")
    elif not report["libhccl_visible"]:
        missing.append(f"CANN libraries on LD_LIBRARY_PATH (source {home}/../set_env.sh)")
    if not missing or "torch_npu" in sys.modules:
        if npu_available():
            report["npu_count"] = int(getattr(import_torch_npu().npu, "device_count", lambda: 1)())
        else:
            missing.append("a visible NPU (check the driver, npu-smi info and ASCEND_RT_VISIBLE_DEVICES)")
    return report


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
