from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ricefm.vocab import GeneVocab

FIXTURES = Path(__file__).parent / "fixtures" / "original_small"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def reference():
    return dict(np.load(FIXTURES / "reference.npz"))


@pytest.fixture(scope="session")
def binning_ref():
    return dict(np.load(FIXTURES / "binning.npz"))


def gene_names(n: int, prefix: str = "LOC_Os01g") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def random_counts(n_cells: int, n_genes: int, density: float = 0.2, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    m = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.geometric(0.3, size=k).astype(np.float32))
    return m.astype(np.float32)


def write_h5ad(path: Path, X, genes: list[str], obs: dict | None = None, var: dict | None = None,
               layers: dict | None = None) -> Path:
    n = X.shape[0]
    obs_df = pd.DataFrame(obs or {}, index=[f"cell{i}" for i in range(n)])
    var_df = pd.DataFrame(var or {}, index=genes)
    ad.AnnData(X=X, obs=obs_df, var=var_df, layers=layers).write_h5ad(path)
    return path


@pytest.fixture
def vocab_path(tmp_path) -> Path:
    p = tmp_path / "vocab.json"
    GeneVocab.from_genes(gene_names(300)).save(p)
    return p
