"""Package discovery (the rest of the metadata is in pyproject.toml).

Every subpackage is found, so none can be left out of the wheel (a hand-written list once dropped
``ricefm.evaluate``); ``configs/`` is added under its installed name, ``ricefm_configs``, which
pyproject's ``package-dir`` maps and ``find_packages`` cannot see.
"""

from setuptools import find_packages, setup

PACKAGES = ("ricefm", "ricefm_jax", "ricefm_npu", "ricefm_cli", "converters")

setup(packages=find_packages(include=[p for name in PACKAGES for p in (name, f"{name}.*")]) + ["ricefm_configs"])
