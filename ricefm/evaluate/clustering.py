"""Zero-shot cell-type separation of an embedding with scib: NMI and ARI of Leiden clusters at the
NMI-optimal resolution, scaled cell-type silhouette (ASW), and AvgBIO = their mean; plus the
standard PCA baseline (log1p-normalized, 2k HVGs, 50 PCs) computed from the same cells."""

from __future__ import annotations

import contextlib
import io

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ricefm.errors import RiceFMInputError


def leiden(adata: ad.AnnData, resolution: float, key_added: str, **kwargs) -> None:
    """A named clustering function (scib's optimal-resolution search wants one, not a partial)."""
    import scanpy as sc

    sc.tl.leiden(adata, resolution=resolution, key_added=key_added, flavor="igraph", n_iterations=2,
                 directed=False, random_state=0)


def check_labels(labels: pd.Series, source: str, label_key: str) -> None:
    if labels.nunique() < 2:
        raise RiceFMInputError(f"{source}: obs[{label_key!r}] has {labels.nunique()} class(es) among the evaluated "
                               "cells; cell-type metrics need at least 2")


def _embedding_adata(embedding: np.ndarray) -> ad.AnnData:
    """An AnnData with a zero X (scanpy wants one) and the embedding in obsm; string obs names avoid
    anndata's index warning."""
    n = len(embedding)
    a = ad.AnnData(X=np.zeros((n, 1), np.float32), obs=pd.DataFrame(index=pd.Index(np.arange(n).astype(str))))
    a.obsm["X_emb"] = np.asarray(embedding, np.float32)
    return a


def zero_shot_metrics(embedding: np.ndarray, labels: pd.Series, seed: int = 0) -> dict[str, float]:
    import scanpy as sc
    import scib

    a = _embedding_adata(embedding)
    a.obs["label"] = labels.astype("category").values
    sc.pp.neighbors(a, use_rep="X_emb", random_state=seed)
    with contextlib.redirect_stdout(io.StringIO()):  # scib prints a line per resolution even with verbose=False
        scib.metrics.cluster_optimal_resolution(a, label_key="label", cluster_key="cluster", cluster_function=leiden,
                                                metric=scib.metrics.nmi, use_rep="X_emb", verbose=False)
    nmi = float(scib.metrics.nmi(a, "cluster", "label"))
    ari = float(scib.metrics.ari(a, "cluster", "label"))
    asw = float(scib.metrics.silhouette(a, label_key="label", embed="X_emb", scale=True))
    return {"NMI": nmi, "ARI": ari, "ASW": asw, "AvgBIO": (nmi + ari + asw) / 3,
            "n_clusters": int(a.obs["cluster"].nunique())}


def pca_baseline(X: sp.spmatrix | np.ndarray, is_counts: bool = True, n_hvg: int = 2000, n_pcs: int = 50) -> np.ndarray:
    import scanpy as sc

    a = ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32))
    if is_counts:
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=min(n_hvg, a.n_vars), subset=True)
    n = min(n_pcs, a.n_vars - 1, a.n_obs - 1)
    sc.pp.pca(a, n_comps=n, random_state=0)
    return a.obsm["X_pca"]


def umap_png(embeddings: dict[str, np.ndarray], labels: pd.Series, path, title: str) -> None:
    """One UMAP panel per embedding, coloured by cell type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    cats = labels.astype("category").cat.categories
    colors = dict(zip(cats, plt.cm.tab20(np.linspace(0, 1, max(len(cats), 2)))))
    fig, axes = plt.subplots(1, len(embeddings), figsize=(5 * len(embeddings), 4.6), squeeze=False)
    for ax, (name, emb) in zip(axes[0], embeddings.items()):
        a = _embedding_adata(emb)
        sc.pp.neighbors(a, use_rep="X_emb", random_state=0)
        sc.tl.umap(a, random_state=0)
        xy = a.obsm["X_umap"]
        for c in cats:
            m = (labels == c).to_numpy()
            ax.scatter(xy[m, 0], xy[m, 1], s=4, color=colors[c], label=str(c))
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
