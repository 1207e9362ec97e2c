"""Which JAX devices a run uses, from the same ``--device`` choices as the torch backend.

Mirrors ``ricefm_npu/devices.py``: ``auto`` takes JAX's default platform (TPU, then GPU, then CPU,
as JAX orders them), ``cuda`` the GPUs, ``tpu`` the TPUs, ``cpu`` the host; ``npu`` has no JAX
backend and is refused with a clear line. The device class names the platform the way the rest
of the project does (``cuda`` for JAX's ``gpu``), so ``precision=auto`` means the same everywhere.
"""

from __future__ import annotations

import jax

from ricefm.errors import RiceFMInputError
from ricefm.precision import DEVICE_CHOICES, resolve_precision

_PLATFORM = {"cpu": "cpu", "cuda": "gpu", "tpu": "tpu"}
_CLASS = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "rocm": "cuda", "tpu": "tpu"}


def resolve_devices(requested: str = "auto") -> list[jax.Device]:
    """All devices of the requested platform (every one of them joins the data-parallel mesh)."""
    if requested not in DEVICE_CHOICES:
        raise RiceFMInputError(f"--device {requested!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if requested == "npu":
        raise RiceFMInputError("--device npu: JAX has no Ascend backend; use the torch backend "
                               "(python -m ricefm_npu.train, --backend torch) for NPUs")
    if requested == "auto":
        return jax.devices()
    try:
        return jax.devices(_PLATFORM[requested])
    except RuntimeError:
        raise RiceFMInputError(f"--device {requested}: JAX sees no {requested} device (it has "
                               f"{jax.default_backend()}); use --device auto or cpu") from None


def device_class(device: jax.Device) -> str:
    return _CLASS.get(device.platform, device.platform)


def compute_dtype(precision: str, device: jax.Device):
    """The compute dtype for ``train.precision`` on ``device`` (parameters stay fp32).

    fp16 would need loss scaling, which the JAX path does not do; it is refused with the fix.
    """
    import jax.numpy as jnp

    resolved = resolve_precision(precision, device_class(device))
    if resolved == "fp16":
        raise RiceFMInputError("--config.train.precision=fp16: the JAX path supports auto, fp32, bf16 (no loss scaling)")
    return {"fp32": jnp.float32, "bf16": jnp.bfloat16}[resolved]
