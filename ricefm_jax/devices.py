"""Which JAX devices a run uses, from the same ``--device`` choices as the torch backend.

Mirrors ``ricefm_npu/devices.py``: ``auto`` takes JAX's default platform (TPU, then GPU, then CPU,
as JAX orders them), ``cuda`` the GPUs, ``tpu`` the TPUs, ``cpu`` the host; ``npu`` has no JAX
backend and is refused with a clear line. The device class names the platform the way the rest
of the project does (``cuda`` for JAX's ``gpu``), so ``precision=auto`` means the same everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def compilation_cache(directory: str | Path | None) -> Iterator[None]:
    """Keep the XLA programs compiled inside the block in ``directory`` (None: no persistent cache).

    A run compiles one step program per batch shape (bucket lengths x gen ratios: 48 on the shipped
    cells, ~15 s each on 2 CPU cores); a resumed or repeated run loads them from here instead. JAX keys
    an entry by the program, its compile options and the jax/jaxlib versions, so several runs may share
    one directory. The process's previous setting comes back afterwards.
    """
    from jax.experimental.compilation_cache import compilation_cache as cache

    settings = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = [getattr(jax.config, name) for name in settings]
    cache.reset_cache()  # JAX opens its cache once per process: a new directory needs a reset
    jax.config.update(settings[0], None if directory is None else str(directory))
    jax.config.update(settings[1], 0.0)  # every program a run compiles is worth keeping
    try:
        yield
    finally:
        cache.reset_cache()
        for name, value in zip(settings, before):
            jax.config.update(name, value)
