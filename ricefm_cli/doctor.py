"""``ricefm doctor``: what this machine offers each backend, on one screen.

Versions come from package metadata and CANN from its install folder, so a machine with torch-npu
but no CANN is reported, not crashed: torch_npu is never imported there, and torch's automatic
loading of device backends is switched off for this command (``TORCH_DEVICE_BACKEND_AUTOLOAD=0``),
since with torch-npu installed ``import torch`` itself would otherwise fail without CANN.
"""

from __future__ import annotations

import os

from ricefm import environment
from ricefm.backends import BACKENDS, get_backend
from ricefm.errors import RiceFMInputError


def report(device: str = "auto") -> list[tuple[str, str]]:
    """(label, finding) lines: Python and NumPy, then each backend's own lines, or how to install it."""
    import numpy

    if environment.cann_home() is None and not environment.cann_libraries_visible():
        os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    lines = [("python", environment.python_summary()), ("numpy", numpy.__version__)]
    conflict = environment.torch_numpy_conflict(environment.package_version("torch"), numpy.__version__)
    if conflict:
        lines.append(("torch + numpy", conflict))
    for name in BACKENDS:
        try:
            lines += get_backend(name).doctor(device)
        except RiceFMInputError as e:
            lines.append((name, str(e)))
    return lines


def format_report(lines: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label:<{width}}  {finding}" for label, finding in lines)
