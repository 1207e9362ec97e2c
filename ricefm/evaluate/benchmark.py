"""`ricefm benchmark`: embed a labelled dataset with each backend, score zero-shot cell-type
separation next to a PCA baseline, and write report.json, report.md and UMAP plots.

The output folder is assembled under a temporary name and swapped in when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ricefm.errors import RiceFMInputError
from ricefm.evaluate.clustering import check_labels, pca_baseline, umap_png, zero_shot_metrics
from ricefm.evaluate.datasets import EvalDataset
from ricefm.shards.gene_space import VocabMapping, modality_codes, translated_genes
from ricefm.shards.sources import H5adSource

METRICS = ("AvgBIO", "NMI", "ARI", "ASW")


def _agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "max_abs_diff": float(np.abs(a - b).max())}


def markdown(report: dict[str, Any]) -> str:
    cols = list(report["methods"])
    lines = [f"# riceFM benchmark: {report['dataset']['name']} ({report['dataset']['cells_evaluated']:,} cells, "
             f"{report['dataset']['n_classes']} cell types)", "",
             f"checkpoint `{report['checkpoint']}`", "",
             "| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in METRICS:
        lines.append(f"| {m} | " + " | ".join(f"{report['methods'][c][m]:.3f}" for c in cols) + " |")
    lines.append("| cells/s | " + " | ".join(
        f"{report['methods'][c]['cells_per_s']:,.0f}" if "cells_per_s" in report["methods"][c] else "-" for c in cols) + " |")
    if report.get("agreement"):
        a = report["agreement"]
        lines += ["", f"Backend agreement ({a['pair']}): per-cell cosine min {a['cosine_min']:.6f}, "
                      f"mean {a['cosine_mean']:.6f}; max |difference| {a['max_abs_diff']:.2e}"]
    lines += ["", "AvgBIO = mean(NMI, ARI, ASW); NMI/ARI from Leiden clusters at the NMI-optimal resolution (scib); "
                  "ASW = scib's scaled cell-type silhouette. PCA: log1p-normalized, 2k HVGs, 50 PCs.", ""]
    return "\n".join(lines)


def run_benchmark(checkpoint: str | Path, dataset: EvalDataset, backends: Sequence[str], output: str | Path,
                  batch_size: int = 64, max_seq_len: int | None = None, device: str = "auto",
                  min_gene_fraction: float = 0.1, progress: bool = True) -> dict[str, Any]:
    from ricefm.embed import embed_cells, load_embedder

    output = Path(output)
    src = H5adSource.open(dataset.path)
    try:
        labels_all = src.obs_column(dataset.label_key, "--label-key").astype(object)
        keep = labels_all.notna().to_numpy() & ~labels_all.astype(str).isin(dataset.exclude_labels).to_numpy()
        labels = labels_all[keep].astype(str).reset_index(drop=True)
        check_labels(labels, str(dataset.path), dataset.label_key)
        counts = src.read_rows(0, src.n_obs)
        embeddings, methods = {}, {}
        for backend in backends:
            embedder = load_embedder(backend, checkpoint, device=device)
            genes, _ = translated_genes(src, None)
            mapping = VocabMapping.build(src, genes, embedder.vocab, min_gene_fraction, None, None, 0)
            seq = int(max_seq_len or embedder.model_config.get("max_seq_len", 1200))
            t0 = time.perf_counter()
            emb, _ = embed_cells(embedder, src, mapping, modality_codes(src, "scrna"), batch_size, seq, "highest", progress)
            seconds = time.perf_counter() - t0
            no_genes = int((np.diff(mapping.apply(counts).indptr)[keep] == 0).sum())
            if no_genes:
                raise RiceFMInputError(f"{dataset.path}: {no_genes} evaluated cells have no gene in the checkpoint's "
                                       "vocabulary; remove them or use a checkpoint whose vocabulary matches the data")
            embeddings[backend] = emb[keep]
            methods[backend] = {**zero_shot_metrics(emb[keep], labels), "cells_per_s": src.n_obs / seconds,
                                "max_seq_len": seq, "backend": embedder.description}
        is_counts = bool(np.all(np.mod(counts.data, 1) == 0))
        pca = pca_baseline(counts[np.flatnonzero(keep)], is_counts=is_counts)
        methods["PCA"] = zero_shot_metrics(pca, labels)
    finally:
        src.close()
    report = {"checkpoint": str(checkpoint), "dataset": {"name": dataset.name, "path": str(dataset.path),
                                                        "label_key": dataset.label_key, "cells": src.n_obs,
                                                        "cells_evaluated": int(keep.sum()),
                                                        "excluded_labels": list(dataset.exclude_labels),
                                                        "n_classes": int(labels.nunique())},
              "methods": methods}
    if len(embeddings) >= 2:
        a, b = list(embeddings)[:2]
        report["agreement"] = {"pair": f"{a} vs {b}", **_agreement(embeddings[a], embeddings[b])}
    staged = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    (staged / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (staged / "report.md").write_text(markdown(report))
    umap_png({**{f"riceFM ({k})": v for k, v in embeddings.items()}, "PCA": pca}, labels, staged / "umap.png",
             f"{dataset.name}: cell types")
    if output.exists():
        shutil.rmtree(output)
    os.replace(staged, output)
    return report
