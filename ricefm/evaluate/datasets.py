"""Named evaluation datasets with their label keys; any h5ad path works too."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import anndata as ad

from ricefm.atomic import atomic_file
from ricefm.errors import RiceFMInputError


@dataclass(frozen=True)
class EvalDataset:
    name: str
    path: Path  # an h5ad with non-negative expression in X (raw counts or log-normalized)
    label_key: str
    exclude_labels: tuple[str, ...] = ()


def _rice_root() -> EvalDataset:
    ref = resources.files("ricefm.resources").joinpath("rice_root_SRP309176_2k.h5ad")
    with resources.as_file(ref) as p:
        return EvalDataset("rice_root", Path(p), "celltype", ("unlabeled",))


def _pbmc68k_reduced() -> EvalDataset:
    """scanpy's bundled human PBMC subset (offline). Its X is scaled with negatives, so the
    log-normalized ``.raw`` matrix is used; pair it with a vocabulary built from its genes."""
    import scanpy as sc

    a = sc.datasets.pbmc68k_reduced()
    out = ad.AnnData(X=a.raw.X.copy(), obs=a.obs[["bulk_labels", "phase"]].copy(), var=a.raw.var[[]].copy())
    path = Path(tempfile.gettempdir()) / "ricefm_pbmc68k_reduced_raw.h5ad"
    with atomic_file(path, ".h5ad") as tmp:  # concurrent runs (two test suites) share this path
        out.write_h5ad(tmp)
    return EvalDataset("pbmc68k_reduced", path, "bulk_labels")


DATA_DIR_ENV = "RICEFM_DATA_DIR"
RICE_ROOT_ATLAS = "rice_root_atlas.h5ad"


def data_dir() -> Path:
    """Where registered datasets that are not shipped are looked for: $RICEFM_DATA_DIR, else ~/.cache/ricefm."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "ricefm")


def _rice_root_atlas() -> EvalDataset:
    """The whole rice radicle atlas the shipped 2,000 cells come from (SRA SRP309176, Zhang et al. 2021,
    scPlantDB labels), prepared once by the user (README, "Evaluation at scale"): too large to ship."""
    path = data_dir() / RICE_ROOT_ATLAS
    if not path.is_file():
        raise RiceFMInputError(f"--dataset rice_root_atlas: {path} not found; prepare it once as the README's "
                               f"'Evaluation at scale' recipe says (or set {DATA_DIR_ENV} to its folder)")
    return EvalDataset("rice_root_atlas", path, "celltype", ("unlabeled",))


REGISTRY = {"rice_root": _rice_root, "rice_root_atlas": _rice_root_atlas, "pbmc68k_reduced": _pbmc68k_reduced}


def resolve_dataset(name_or_path: str, label_key: str | None = None,
                    exclude_labels: tuple[str, ...] | None = None) -> EvalDataset:
    """A registered dataset (its label key unless overridden) or an h5ad path with its label key;
    cells whose label is in ``exclude_labels`` (e.g. ``unlabeled``) are left out of all metrics."""
    if name_or_path in REGISTRY:
        ds = REGISTRY[name_or_path]()
        return EvalDataset(ds.name, ds.path, label_key or ds.label_key,
                           ds.exclude_labels if exclude_labels is None else tuple(exclude_labels))
    path = Path(name_or_path)
    if not path.is_file():
        raise RiceFMInputError(f"--dataset {name_or_path!r}: neither a registered dataset "
                               f"({', '.join(REGISTRY)}) nor an existing .h5ad file")
    if not label_key:
        raise RiceFMInputError(f"--dataset {path}: pass --label-key (the obs column with cell types)")
    return EvalDataset(path.stem, path, label_key, tuple(exclude_labels or ()))
