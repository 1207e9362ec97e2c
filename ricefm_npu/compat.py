"""What differs between the torch releases this backend runs on, from the Ascend stack's torch 2.1 up
to the newest CPU build the project pins; the rest of ``ricefm_npu`` calls these instead of checking
versions itself."""

from __future__ import annotations

import torch

from ricefm.environment import check_torch_numpy, major_minor


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``version`` (default: the running torch)."""
    return major_minor(version or torch.__version__)


def grad_scaler(device: torch.device, enabled: bool):
    """The fp16 loss scaler for ``device``. torch 2.3 made ``torch.amp.GradScaler(device)`` generic;
    before it CUDA has ``torch.cuda.amp.GradScaler``, and Ascend always brings its own in torch_npu.
    A disabled scaler (fp32/bf16) is a pass-through on every device."""
    if device.type == "npu":
        from ricefm_npu.devices import import_torch_npu

        return import_torch_npu().npu.amp.GradScaler(enabled=enabled)
    if torch_version() >= (2, 3):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    if enabled and device.type != "cuda":
        raise ValueError(f"torch {torch.__version__} has no fp16 grad scaler for {device.type}")
    return torch.cuda.amp.GradScaler(enabled=enabled)


def check_runtime() -> None:
    """Refuse, with the fix, a torch that cannot run here (torch < 2.3 with NumPy 2)."""
    check_torch_numpy(torch.__version__)
