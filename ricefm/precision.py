"""Device classes and what ``precision=auto`` means on each: one answer for both backends.

A device class is where the numbers are computed: ``cpu``, ``cuda`` (an NVIDIA GPU, JAX's ``gpu``),
``npu`` (Ascend, torch only) or ``tpu`` (JAX only). ``auto`` picks fp32 on CPU (neither XLA nor
torch runs bf16 faster there), bf16 on CUDA and TPU (their matrix units' native type; no loss
scaling needed) and fp16 with a grad scaler on NPU (the published riceFM runs; Ascend 910A has no
bf16). Explicit choices are checked here too, so both backends refuse the same combinations.
"""

from __future__ import annotations

from ricefm.errors import RiceFMInputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "npu", "tpu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTO_PRECISION = {"cpu": "fp32", "cuda": "bf16", "tpu": "bf16", "npu": "fp16"}


def resolve_precision(precision: str, device_class: str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``train.precision`` on a device class."""
    if device_class not in AUTO_PRECISION:
        raise ValueError(f"unknown device class {device_class!r}")
    if precision not in PRECISIONS:
        raise RiceFMInputError(f"--config.train.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    resolved = AUTO_PRECISION[device_class] if precision == "auto" else precision
    if resolved == "fp16" and device_class not in ("npu", "cuda"):
        raise RiceFMInputError(f"--config.train.precision=fp16 needs an NPU or CUDA device (this run is on "
                               f"{device_class}); use bf16 or fp32")
    return resolved
