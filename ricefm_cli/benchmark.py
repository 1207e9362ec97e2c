"""`ricefm benchmark`: for each backend, embed a labelled dataset and score zero-shot cell-type
separation next to a PCA baseline, then fine-tune a cell-type classifier over several seeds next
to a logistic-regression probe of the PCA; write report.json, report.md, umap.png, confusion.png.

This is the orchestration (checkpoint, backends through the registry, output folder); the metrics,
Markdown and figures are backend-neutral, in ``ricefm.evaluate``. The output folder is assembled
under a temporary name and swapped in when complete.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np

from converters.formats import load_checkpoint
from ricefm.atomic import staged_dir
from ricefm.cells import TokenizedCells
from ricefm.embed import BLOCK_CELLS, INFERENCE_MAX_SEQ_LEN, check_embed_settings, embed_cells, embed_tokenized, load_embedder
from ricefm.evaluate import annotation as ann
from ricefm.evaluate.clustering import pca_baseline, zero_shot_metrics
from ricefm.evaluate.datasets import EvalDataset
from ricefm.evaluate.report import PROBE, LabelledData, agreement, fine_tune_speed, load_labelled, write_report
from ricefm.shards.gene_space import VocabMapping, translated_genes
from ricefm.shards.sources import H5adSource


def _zero_shot(checkpoint, data: LabelledData, src: H5adSource, backends: Sequence[str], batch_size: int,
               max_seq_len: int | None, device: str, min_gene_fraction: float, progress: bool
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    methods, embeddings = {}, {}
    for backend in backends:
        embedder = load_embedder(backend, checkpoint, device=device)
        genes, _ = translated_genes(src, None)
        mapping = VocabMapping.build(src, genes, embedder.vocab, min_gene_fraction, None, None, 0)
        seq = int(max_seq_len or INFERENCE_MAX_SEQ_LEN)
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
        methods[backend] = {**result, **fine_tune_speed(result["seeds"]), "backend": run.ft.description}
    methods[PROBE] = ann.probe_baseline(pca[in_classes], y, classes, cfg)
    out = {"config": cfg.to_dict(), "classes": classes, "excluded_classes": dropped, "cells": int(len(y)),
           "methods": methods}
    if len(backends) >= 2:
        a, b = backends[:2]
        out["agreement"] = {"pair": f"{a} vs {b}", "same_test_prediction": ann.prediction_agreement(methods[a],
                                                                                                    methods[b])}
    return out


def run_benchmark(checkpoint: str | Path, dataset: EvalDataset, backends: Sequence[str], output: str | Path,
                  batch_size: int = 64, max_seq_len: int | None = None, device: str = "auto",
                  min_gene_fraction: float = 0.1, progress: bool = True,
                  annotation: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """Score ``checkpoint`` on ``dataset`` with each backend; the report, also written to ``output``."""
    check_embed_settings(batch_size, max_seq_len)
    vocab = load_checkpoint(checkpoint).vocab
    src = H5adSource.open(dataset.path)
    try:
        data = load_labelled(src, dataset, vocab, min_gene_fraction)
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
        report["agreement"] = {"pair": f"{a} vs {b}", **agreement(embeddings[a], embeddings[b])}
    if annotation is not None and annotation.enabled:
        report["annotation"] = _annotation(checkpoint, data, pca, backends, device, annotation, progress)
    with staged_dir(output) as folder:
        write_report(folder, report, embeddings, pca, data.labels, backends)
    return report
