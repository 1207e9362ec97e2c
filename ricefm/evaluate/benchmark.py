"""`ricefm benchmark`: for each backend, embed a labelled dataset and score zero-shot cell-type
separation next to a PCA baseline, then fine-tune a cell-type classifier over several seeds next
to a logistic-regression probe of the PCA; write report.json, report.md, umap.png, confusion.png.

The output folder is assembled under a temporary name and swapped in when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ricefm.cells import TokenizedCells
from ricefm.errors import RiceFMInputError
from ricefm.evaluate import annotation as ann
from ricefm.evaluate.clustering import check_labels, pca_baseline, umap_png, zero_shot_metrics
from ricefm.evaluate.datasets import EvalDataset
from ricefm.shards.gene_space import VocabMapping, modality_codes, translated_genes
from ricefm.shards.sources import H5adSource

METRICS = ("AvgBIO", "NMI", "ARI", "ASW")
PROBE = "PCA + LR"


def _agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "max_abs_diff": float(np.abs(a - b).max())}


@dataclass
class LabelledData:
    """The dataset's cells mapped to the checkpoint vocabulary, and which of them are scored."""

    counts: sp.csr_matrix
    mapped: sp.csr_matrix
    modality: np.ndarray
    keep: np.ndarray  # bool over all cells: labelled and not excluded
    labels: pd.Series  # labels of the kept cells


def _load(src: H5adSource, dataset: EvalDataset, vocab, min_gene_fraction: float) -> LabelledData:
    labels_all = src.obs_column(dataset.label_key, "--label-key").astype(object)
    keep = labels_all.notna().to_numpy() & ~labels_all.astype(str).isin(dataset.exclude_labels).to_numpy()
    labels = labels_all[keep].astype(str).reset_index(drop=True)
    check_labels(labels, str(dataset.path), dataset.label_key)
    genes, _ = translated_genes(src, None)
    mapping = VocabMapping.build(src, genes, vocab, min_gene_fraction, None, None, 0)
    counts = src.read_rows(0, src.n_obs)
    mapped = mapping.apply(counts)
    no_genes = int((np.diff(mapped.indptr)[keep] == 0).sum())
    if no_genes:
        raise RiceFMInputError(f"{dataset.path}: {no_genes} evaluated cells have no gene in the checkpoint's "
                               "vocabulary; remove them or use a checkpoint whose vocabulary matches the data")
    return LabelledData(counts, mapped, modality_codes(src, "scrna"), keep, labels)


def _zero_shot(checkpoint, data: LabelledData, src: H5adSource, backends: Sequence[str], batch_size: int,
               max_seq_len: int | None, device: str, min_gene_fraction: float, progress: bool
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from ricefm.embed import BLOCK_CELLS, embed_cells, embed_tokenized, load_embedder

    methods, embeddings = {}, {}
    for backend in backends:
        embedder = load_embedder(backend, checkpoint, device=device)
        genes, _ = translated_genes(src, None)
        mapping = VocabMapping.build(src, genes, embedder.vocab, min_gene_fraction, None, None, 0)
        seq = int(max_seq_len or embedder.model_config.get("max_seq_len", 1200))
        t0 = time.perf_counter()
        emb, _ = embed_cells(embedder, src, mapping, data.modality, batch_size, seq, "highest", progress)
        first_pass = time.perf_counter() - t0
        # steady state: the first block again, its shapes compiled by now (first pass: XLA compiles per shape)
        n = min(BLOCK_CELLS, src.n_obs)
        block = TokenizedCells.from_mapped(data.mapped[:n], data.modality[:n])
        t0 = time.perf_counter()
        embed_tokenized(embedder, block, batch_size, seq, "highest")
        steady = time.perf_counter() - t0
        embeddings[backend] = emb[data.keep]
        methods[backend] = {**zero_shot_metrics(emb[data.keep], data.labels), "cells_per_s": n / steady,
                            "first_pass_cells_per_s": src.n_obs / first_pass,
                            "max_seq_len": seq, "backend": embedder.description}
    return methods, embeddings


def _fine_tune_speed(seeds: list[dict[str, Any]]) -> dict[str, float]:
    """Training cells/s: steady state leaves out the first epoch (JAX compiles its steps there; the
    compiled steps are reused by later seeds), ``first_epoch`` is that epoch alone."""
    epochs = [h for r in seeds for h in r["history"]]
    rest = epochs[1:] or epochs
    return {"train_cells_per_s": sum(h["train_cells"] for h in rest) / sum(h["train_seconds"] for h in rest),
            "first_epoch_train_cells_per_s": epochs[0]["train_cells"] / epochs[0]["train_seconds"]}


def _annotation(checkpoint, data: LabelledData, pca: np.ndarray, backends: Sequence[str], device: str,
                cfg: ml_collections.ConfigDict, progress: bool) -> dict[str, Any]:
    classes, dropped = ann.eligible_classes(data.labels, int(cfg.min_cells_per_class))
    in_classes = data.labels.isin(classes).to_numpy()
    rows = np.flatnonzero(data.keep)[in_classes]  # rows of the dataset
    y = np.searchsorted(classes, data.labels.to_numpy()[in_classes])
    cells = TokenizedCells.from_mapped(data.mapped[rows], data.modality[rows])
    methods: dict[str, Any] = {}
    for backend in backends:
        run = ann.AnnotationRun(ann.load_finetuner(backend, checkpoint, device), cells, y, classes, cfg, progress)
        result = run.run()
        methods[backend] = {**result, **_fine_tune_speed(result["seeds"]), "backend": run.ft.description}
    methods[PROBE] = ann.probe_baseline(pca[in_classes], y, classes, cfg)
    out = {"config": cfg.to_dict(), "classes": classes, "excluded_classes": dropped, "cells": int(len(y)),
           "methods": methods}
    if len(backends) >= 2:
        a, b = backends[:2]
        out["agreement"] = {"pair": f"{a} vs {b}", "same_test_prediction": ann.prediction_agreement(methods[a],
                                                                                                    methods[b])}
    return out


def _pm(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"


def _rate_row(name: str, methods: dict[str, Any], key: str) -> str:
    return f"| {name} | " + " | ".join(f"{m[key]:,.0f}" if key in m else "-" for m in methods.values()) + " |"


def markdown(report: dict[str, Any]) -> str:
    cols = list(report["methods"])
    lines = [f"# riceFM benchmark: {report['dataset']['name']} ({report['dataset']['cells_evaluated']:,} cells, "
             f"{report['dataset']['n_classes']} cell types)", "",
             f"checkpoint `{report['checkpoint']}`", "", "## Zero-shot cell embedding", "",
             "| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in METRICS:
        lines.append(f"| {m} | " + " | ".join(f"{report['methods'][c][m]:.3f}" for c in cols) + " |")
    lines += [_rate_row("embed cells/s", report["methods"], "cells_per_s"),
              _rate_row("first pass cells/s", report["methods"], "first_pass_cells_per_s")]
    if report.get("agreement"):
        a = report["agreement"]
        lines += ["", f"Backend agreement ({a['pair']}): per-cell cosine min {a['cosine_min']:.6f}, "
                      f"mean {a['cosine_mean']:.6f}; max |difference| {a['max_abs_diff']:.2e}"]
    lines += ["", "AvgBIO = mean(NMI, ARI, ASW); NMI/ARI from Leiden clusters at the NMI-optimal resolution (scib); "
                  "ASW = scib's scaled cell-type silhouette. PCA: log1p-normalized, 2k HVGs, 50 PCs. "
                  "embed cells/s: steady state; first pass: every cell once, including JAX's compilation per "
                  "batch shape.", ""]
    if report.get("annotation"):
        lines += _annotation_markdown(report["annotation"])
    return "\n".join(lines)


def _annotation_markdown(a: dict[str, Any]) -> list[str]:
    cols = list(a["methods"])
    cfg = a["config"]
    mode = "frozen encoder, head only" if cfg["freeze_encoder"] else "encoder + head fine-tuned"
    lines = ["## Cell-type annotation", "",
             f"{a['cells']:,} cells, {len(a['classes'])} classes; test split, mean ± sd over seeds "
             f"{', '.join(str(s) for s in cfg['seeds'])} ({mode}).", "",
             "| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in ann.METRICS:
        lines.append(f"| {m} | " + " | ".join(_pm(a["methods"][c]["metrics"][m]) for c in cols) + " |")
    lines += [_rate_row("fine-tune cells/s", a["methods"], "train_cells_per_s"),
              _rate_row("first epoch cells/s", a["methods"], "first_epoch_train_cells_per_s")]
    if a.get("agreement"):
        lines += ["", f"Backend agreement ({a['agreement']['pair']}): same predicted type for "
                      f"{a['agreement']['same_test_prediction']:.1%} of test cells."]
    support = {c: a["methods"][cols[0]]["seeds"][0]["per_class"][c]["support"] for c in a["classes"]}
    lines += ["", "Per-class F1 (mean over seeds; test cells of seed " f"{cfg['seeds'][0]}):", "",
              "| cell type | test cells | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for c in a["classes"]:
        lines.append(f"| {c} | {support[c]} | " + " | ".join(
            f"{a['methods'][m]['per_class_f1'][c]['mean']:.2f}" for m in cols) + " |")
    if a["excluded_classes"]:
        lines += ["", "Left out of annotation (fewer than "
                      f"{cfg['min_cells_per_class']} cells): "
                      + ", ".join(f"{k} ({v})" for k, v in a["excluded_classes"].items())]
    lines += ["", f"{PROBE}: class-balanced logistic regression on the PCA baseline, same splits. Fine-tune "
                  "cells/s: training steps after the first epoch (where JAX compiles); first epoch: that epoch alone.",
              ""]
    return lines


def run_benchmark(checkpoint: str | Path, dataset: EvalDataset, backends: Sequence[str], output: str | Path,
                  batch_size: int = 64, max_seq_len: int | None = None, device: str = "auto",
                  min_gene_fraction: float = 0.1, progress: bool = True,
                  annotation: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    from converters.formats import load_checkpoint

    output = Path(output)
    vocab = load_checkpoint(checkpoint).vocab
    src = H5adSource.open(dataset.path)
    try:
        data = _load(src, dataset, vocab, min_gene_fraction)
        if annotation is not None and annotation.enabled:  # bad settings fail before any model runs
            ann.validate_config(annotation)
            ann.eligible_classes(data.labels, int(annotation.min_cells_per_class))
        methods, embeddings = _zero_shot(checkpoint, data, src, backends, batch_size, max_seq_len, device,
                                         min_gene_fraction, progress)
    finally:
        src.close()
    is_counts = bool(np.all(np.mod(data.counts.data, 1) == 0))
    pca = pca_baseline(data.counts[np.flatnonzero(data.keep)], is_counts=is_counts)
    methods["PCA"] = zero_shot_metrics(pca, data.labels)
    report = {"checkpoint": str(checkpoint), "dataset": {"name": dataset.name, "path": str(dataset.path),
                                                        "label_key": dataset.label_key, "cells": src.n_obs,
                                                        "cells_evaluated": int(data.keep.sum()),
                                                        "excluded_labels": list(dataset.exclude_labels),
                                                        "n_classes": int(data.labels.nunique())},
              "methods": methods}
    if len(embeddings) >= 2:
        a, b = list(embeddings)[:2]
        report["agreement"] = {"pair": f"{a} vs {b}", **_agreement(embeddings[a], embeddings[b])}
    if annotation is not None and annotation.enabled:
        report["annotation"] = _annotation(checkpoint, data, pca, backends, device, annotation, progress)

    staged = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    (staged / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (staged / "report.md").write_text(markdown(report))
    umap_png({**{f"riceFM ({k})": v for k, v in embeddings.items()}, "PCA": pca}, data.labels, staged / "umap.png",
             f"{dataset.name}: cell types")
    if "annotation" in report:
        a = report["annotation"]
        ann.confusion_png({(f"riceFM ({m})" if m in backends else m): a["methods"][m]["confusion_total"]
                           for m in a["methods"]}, a["classes"], staged / "confusion.png",
                          f"{dataset.name}: test-set confusion, summed over seeds (rows normalized)")
    if output.exists():
        shutil.rmtree(output)
    os.replace(staged, output)
    return report
