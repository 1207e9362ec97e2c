"""The backend-neutral half of `ricefm benchmark`: the labelled cells it scores, the figures it
derives, and the report it writes (report.json, report.md, umap.png, confusion.png).

The orchestration that loads checkpoints and runs the backends is in ``ricefm_cli.benchmark``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ricefm.errors import RiceFMInputError
from ricefm.evaluate import annotation as ann
from ricefm.evaluate.clustering import check_labels, umap_png
from ricefm.evaluate.datasets import EvalDataset
from ricefm.shards.gene_space import VocabMapping, modality_codes, translated_genes
from ricefm.shards.sources import H5adSource

METRICS = ("AvgBIO", "NMI", "ARI", "ASW")
PROBE = "PCA + LR"


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
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


def load_labelled(src: H5adSource, dataset: EvalDataset, vocab, min_gene_fraction: float) -> LabelledData:
    """The dataset's scored cells mapped to ``vocab``; every scored cell must keep a vocabulary gene."""
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


def fine_tune_speed(seeds: list[dict[str, Any]]) -> dict[str, float]:
    """Training cells/s: steady state leaves out the first epoch (JAX compiles its steps there; the
    compiled steps are reused by later seeds), ``first_epoch`` is that epoch alone."""
    epochs = [h for r in seeds for h in r["history"]]
    rest = epochs[1:] or epochs
    return {"train_cells_per_s": sum(h["train_cells"] for h in rest) / sum(h["train_seconds"] for h in rest),
            "first_epoch_train_cells_per_s": epochs[0]["train_cells"] / epochs[0]["train_seconds"]}


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


def write_report(folder: Path, report: dict[str, Any], embeddings: dict[str, np.ndarray], pca: np.ndarray,
                 labels: pd.Series, backends: Sequence[str], progress: bool = False) -> None:
    """report.json, report.md, umap.png and (with annotation) confusion.png into ``folder``."""
    name = report["dataset"]["name"]
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))
    umap_png({**{f"riceFM ({k})": v for k, v in embeddings.items()}, "PCA": pca}, labels, folder / "umap.png",
             f"{name}: cell types", progress=progress)
    if "annotation" in report:
        a = report["annotation"]
        ann.confusion_png({(f"riceFM ({m})" if m in backends else m): a["methods"][m]["confusion_total"]
                           for m in a["methods"]}, a["classes"], folder / "confusion.png",
                          f"{name}: test-set confusion, summed over seeds (rows normalized)")
