"""Facts about the installed software, read without importing the heavy packages (torch, torch_npu,
jax): package versions from their metadata, Ascend CANN from its install folder. ``ricefm doctor``
prints them; the torch paths use :func:`check_torch_numpy` to refuse a broken combination early."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path

from ricefm.errors import RiceFMInputError

DEFAULT_CANN_HOME = "/usr/local/Ascend/ascend-toolkit/latest"
CANN_HOME_VARIABLES = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string, ignoring pre-release and local tags (``2.1.0+cu121`` -> (2, 1))."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def torch_numpy_conflict(torch_version: str | None, numpy_version: str | None) -> str | None:
    """Why this torch cannot use this NumPy, or None. torch releases before 2.3 are built against
    NumPy 1.x: with NumPy 2 every ``torch.from_numpy`` / ``.numpy()`` fails ("Numpy is not available")."""
    if not torch_version or not numpy_version:
        return None
    if major_minor(torch_version) < (2, 3) and major_minor(numpy_version) >= (2, 0):
        return (f"torch {torch_version} needs NumPy 1.x but NumPy {numpy_version} is installed; "
                "run: pip install 'numpy<2'")
    return None


def check_torch_numpy(torch_version: str | None = None) -> None:
    """Raise the one-line fix when the running torch and NumPy do not work together."""
    import numpy

    problem = torch_numpy_conflict(torch_version or package_version("torch"), numpy.__version__)
    if problem:
        raise RiceFMInputError(problem)


def cann_home() -> Path | None:
    """The Ascend CANN toolkit folder: $ASCEND_TOOLKIT_HOME / $ASCEND_HOME_PATH (set by CANN's
    set_env.sh), else the default install location, if it exists."""
    for var in CANN_HOME_VARIABLES:
        if os.environ.get(var) and Path(os.environ[var]).is_dir():
            return Path(os.environ[var])
    return Path(DEFAULT_CANN_HOME) if Path(DEFAULT_CANN_HOME).is_dir() else None


def cann_version(home: Path | None = None) -> str | None:
    """CANN's version from its install info (``version.cfg`` or ``*install.info``), or None."""
    home = home or cann_home()
    if home is None:
        return None
    for name in ("version.cfg", "ascend_toolkit_install.info", "x86_64-linux/ascend_toolkit_install.info",
                 "aarch64-linux/ascend_toolkit_install.info"):
        path = home / name
        if path.is_file():
            m = re.search(r"^\s*(?:toolkit_installed_version|version|Version)\s*=\s*\[?[\w.:-]*?([0-9][\w.]*)",
                          path.read_text(errors="replace"), re.MULTILINE)
            if m:
                return m.group(1)
    return "unknown version"


def cann_libraries_visible() -> bool:
    """Whether the loader can find CANN's libhccl.so (what ``import torch_npu`` needs)."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    return any((Path(d) / "libhccl.so").exists() for d in dirs)


def python_summary() -> str:
    return f"{platform.python_implementation()} {sys.version.split()[0]} on {platform.machine()} {platform.system()}"
