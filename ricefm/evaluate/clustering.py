"""Zero-shot cell-type separation of an embedding with scib: NMI and ARI of Leiden clusters at the
NMI-optimal resolution, scaled cell-type silhouette (ASW), and AvgBIO = their mean; plus the
standard PCA baseline (log1p-normalized, 2k HVGs, 50 PCs) computed from the same cells.

At scale: the kNN graph is built once (pynndescent from 8,192 cells on, as scanpy does) and every
Leiden resolution of the search reuses it; the silhouette, quadratic in the cells, is computed on
a seeded uniform subsample of at most ``ASW_MAX_CELLS`` cells (reported as ``ASW_cells``), which
is how scib users score atlases."""

from __future__ import annotations

import contextlib
import io
import time

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


ASW_MAX_CELLS = 20_000
RESOLUTIONS = tuple(round(0.2 * k, 1) for k in range(1, 11))  # scib's default search: 0.2, 0.4, ..., 2.0


def zero_shot_metrics(embedding: np.ndarray, labels: pd.Series, seed: int = 0, asw_max_cells: int = ASW_MAX_CELLS,
                      progress: bool = False, desc: str = "zero-shot") -> dict[str, float]:
    import scanpy as sc
    import scib
    from tqdm.auto import tqdm

    a = _embedding_adata(embedding)
    a.obs["label"] = labels.astype("category").values
    timings = {}
    with tqdm(total=2 + len(RESOLUTIONS), desc=desc, unit="step", disable=not progress) as bar:
        t = time.perf_counter()
        bar.set_postfix_str("kNN graph")
        sc.pp.neighbors(a, use_rep="X_emb", random_state=seed)
        timings["neighbors_s"] = time.perf_counter() - t
        bar.update(1)

        def leiden_step(adata, resolution, key_added, **kwargs):  # one bar step per resolution of the search
            bar.set_postfix_str(f"Leiden {resolution}")
            leiden(adata, resolution, key_added, **kwargs)
            bar.update(1)

        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # scib prints a line per resolution even with verbose=False
            scib.metrics.cluster_optimal_resolution(a, label_key="label", cluster_key="cluster",
                                                    cluster_function=leiden_step, metric=scib.metrics.nmi,
                                                    use_rep="X_emb", resolutions=list(RESOLUTIONS), verbose=False)
        timings["leiden_search_s"] = time.perf_counter() - t
        nmi = float(scib.metrics.nmi(a, "cluster", "label"))
        ari = float(scib.metrics.ari(a, "cluster", "label"))
        t = time.perf_counter()
        bar.set_postfix_str("silhouette")
        sub = a
        if a.n_obs > asw_max_cells:
            sub = a[np.sort(np.random.default_rng(seed).choice(a.n_obs, asw_max_cells, replace=False))].copy()
        asw = float(scib.metrics.silhouette(sub, label_key="label", embed="X_emb", scale=True))
        timings["silhouette_s"] = time.perf_counter() - t
        bar.update(1)
    return {"NMI": nmi, "ARI": ari, "ASW": asw, "AvgBIO": (nmi + ari + asw) / 3,
            "n_clusters": int(a.obs["cluster"].nunique()), "ASW_cells": int(sub.n_obs), "cells": int(a.n_obs),
            **timings}


def pca_baseline(X: sp.spmatrix | np.ndarray, is_counts: bool = True, n_hvg: int = 2000, n_pcs: int = 50,
                 progress: bool = False) -> np.ndarray:
    import scanpy as sc
    from tqdm.auto import tqdm

    with tqdm(total=3, desc="PCA baseline", unit="step", disable=not progress) as bar:
        a = ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32))
        if is_counts:
            sc.pp.normalize_total(a, target_sum=1e4)
            sc.pp.log1p(a)
        bar.update(1)
        sc.pp.highly_variable_genes(a, n_top_genes=min(n_hvg, a.n_vars), subset=True)
        bar.update(1)
        n = min(n_pcs, a.n_vars - 1, a.n_obs - 1)
        sc.pp.pca(a, n_comps=n, random_state=0)
        bar.update(1)
    return a.obsm["X_pca"]


UMAP_MAX_CELLS = 30_000


def umap_png(embeddings: dict[str, np.ndarray], labels: pd.Series, path, title: str, seed: int = 0,
             progress: bool = False) -> None:
    """One UMAP panel per embedding, coloured by cell type; above ``UMAP_MAX_CELLS`` cells, of a seeded
    uniform subsample of them (the same cells in every panel; the title says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    n = len(labels)
    if n > UMAP_MAX_CELLS:
        rows = np.sort(np.random.default_rng(seed).choice(n, UMAP_MAX_CELLS, replace=False))
        embeddings = {k: np.asarray(v)[rows] for k, v in embeddings.items()}
        labels = labels.iloc[rows].reset_index(drop=True)
        title = f"{title} ({UMAP_MAX_CELLS:,} of {n:,} cells, seeded subsample)"
    cats = labels.astype("category").cat.categories
    colors = dict(zip(cats, plt.cm.tab20(np.linspace(0, 1, max(len(cats), 2)))))
    fig, axes = plt.subplots(1, len(embeddings), figsize=(5 * len(embeddings), 4.6), squeeze=False)
    from tqdm.auto import tqdm

    for ax, (name, emb) in tqdm(list(zip(axes[0], embeddings.items())), desc="UMAP", unit="panel",
                                disable=not progress):
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
