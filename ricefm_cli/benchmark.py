"""`ricefm benchmark`: for each backend, embed a labelled dataset and score zero-shot cell-type
separation next to a PCA baseline, then fine-tune a cell-type classifier over several seeds next
to a logistic-regression probe of the PCA; write report.json, report.md, umap.png, confusion.png.

This is the orchestration (checkpoint, backends through the registry, output folder); the metrics,
Markdown and figures are backend-neutral, in ``ricefm.evaluate``. The output folder is assembled
under a temporary name and swapped in when complete.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np
from tqdm.auto import tqdm

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


class Phases:
    """Wall time of each phase of the run (report.json ``timings``), printed as it ends."""

    def __init__(self, progress: bool):
        self.seconds: dict[str, float] = {}
        self.progress = progress

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0
        if self.progress:
            tqdm.write(f"[{name}] {self.seconds[name]:.1f} s")


def _warm_up(embedders: dict[str, Any], data: LabelledData, batch_size: int, seq: int) -> dict[str, float]:
    """Embedding seconds per cell per backend, measured on the first cells (after a first, compiling pass)."""
    n = min(2 * batch_size, len(data.keep))
    block = TokenizedCells.from_mapped(data.mapped[:n], data.modality[:n])
    rates = {}
    for backend, embedder in embedders.items():
        embed_tokenized(embedder, block, batch_size, seq, "highest")
        t0 = time.perf_counter()
        embed_tokenized(embedder, block, batch_size, seq, "highest")
        rates[backend] = (time.perf_counter() - t0) / n
    return rates


def plan(data: LabelledData, backends: Sequence[str], seconds_per_cell: dict[str, float],
         annotation: ml_collections.ConfigDict | None, n_cells: int) -> dict[str, Any]:
    """What the run will do and roughly how long it takes, from the measured embedding rate: embedding
    all cells, and fine-tuning taken as 3 forward passes a training cell (forward + backward) plus one a
    validation cell, per epoch, seed and backend (an upper bound: early stopping may end sooner)."""
    out: dict[str, Any] = {"cells": n_cells, "cells_evaluated": int(data.keep.sum()),
                           "classes": int(data.labels.nunique()), "backends": list(backends),
                           "embed_s": {b: seconds_per_cell[b] * n_cells for b in backends}}
    if annotation is not None and annotation.enabled:
        classes, _ = ann.eligible_classes(data.labels, int(annotation.min_cells_per_class))
        cells = int(data.labels.isin(classes).sum())
        train, valid = cells * annotation.split[0], cells * annotation.split[1]
        epochs, seeds = int(annotation.max_epochs), len(annotation.seeds)
        out.update(annotation_cells=cells, annotation_classes=len(classes), seeds=seeds, max_epochs=epochs,
                   fine_tune_s={b: seconds_per_cell[b] * (3 * train + valid) * epochs * seeds for b in backends})
    out["estimate_s"] = sum(out["embed_s"].values()) + sum(out.get("fine_tune_s", {}).values())
    return out


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"plan: {p['cells_evaluated']:,} of {p['cells']:,} cells, {p['classes']} classes, backends "
             f"{', '.join(p['backends'])}"]
    lines.append("  embed: " + ", ".join(f"{b} ~{s / 60:.1f} min" for b, s in p["embed_s"].items()))
    if "fine_tune_s" in p:
        lines.append(f"  annotation: {p['annotation_cells']:,} cells of {p['annotation_classes']} classes, "
                     f"{p['seeds']} seed(s) x up to {p['max_epochs']} epoch(s): "
                     + ", ".join(f"{b} ~{s / 60:.1f} min" for b, s in p["fine_tune_s"].items()))
    lines.append(f"  estimate (embedding + fine-tuning, from a measured warm-up): ~{p['estimate_s'] / 60:.1f} min; "
                 "quick check: --annotation seeds=0 --annotation max_epochs=2")
    return "\n".join(lines)


def _zero_shot(embedders: dict[str, Any], data: LabelledData, src: H5adSource, batch_size: int, seq: int,
               min_gene_fraction: float, progress: bool, phases: Phases
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    methods, embeddings = {}, {}
    for backend, embedder in embedders.items():
        genes, _ = translated_genes(src, None)
        mapping = VocabMapping.build(src, genes, embedder.vocab, min_gene_fraction, None, None, 0)
        with phases(f"embed {backend}"):
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
        with phases(f"zero-shot metrics {backend}"):
            metrics = zero_shot_metrics(emb[data.keep], data.labels, progress=progress, desc=f"zero-shot {backend}")
        methods[backend] = {**metrics, "cells_per_s": n / steady, "first_pass_cells_per_s": src.n_obs / first_pass,
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
    """Score ``checkpoint`` on ``dataset`` with each backend; the report, also written to ``output``.

    Before the long work it prints its plan and a time estimate from a measured warm-up; every phase
    has a progress bar and its wall time goes to report.json (``timings``)."""
    check_embed_settings(batch_size, max_seq_len)
    phases = Phases(progress)
    seq = int(max_seq_len or INFERENCE_MAX_SEQ_LEN)
    vocab = load_checkpoint(checkpoint).vocab
    src = H5adSource.open(dataset.path)
    try:
        with phases("load cells"):
            data = load_labelled(src, dataset, vocab, min_gene_fraction)
        if annotation is not None and annotation.enabled:  # bad settings fail before any model runs
            ann.validate_config(annotation)
            ann.eligible_classes(data.labels, int(annotation.min_cells_per_class))
        with phases("load models and warm up"):
            embedders = {b: load_embedder(b, checkpoint, device=device) for b in backends}
            the_plan = plan(data, backends, _warm_up(embedders, data, batch_size, seq), annotation, src.n_obs)
        if progress:
            tqdm.write(format_plan(the_plan))
        methods, embeddings = _zero_shot(embedders, data, src, batch_size, seq, min_gene_fraction, progress, phases)
        del embedders
    finally:
        src.close()
    is_counts = bool(np.all(np.mod(data.counts.data, 1) == 0))
    with phases("PCA baseline"):
        pca = pca_baseline(data.counts[np.flatnonzero(data.keep)], is_counts=is_counts, progress=progress)
    with phases("zero-shot metrics PCA"):
        methods["PCA"] = zero_shot_metrics(pca, data.labels, progress=progress, desc="zero-shot PCA")
    report = {"checkpoint": str(checkpoint), "dataset": {"name": dataset.name, "path": str(dataset.path),
                                                        "label_key": dataset.label_key, "cells": src.n_obs,
                                                        "cells_evaluated": int(data.keep.sum()),
                                                        "excluded_labels": list(dataset.exclude_labels),
                                                        "n_classes": int(data.labels.nunique())},
              "plan": the_plan, "methods": methods}
    if len(embeddings) >= 2:
        a, b = list(embeddings)[:2]
        report["agreement"] = {"pair": f"{a} vs {b}", **agreement(embeddings[a], embeddings[b])}
    if annotation is not None and annotation.enabled:
        with phases("annotation"):
            report["annotation"] = _annotation(checkpoint, data, pca, backends, device, annotation, progress)
    report["timings"] = phases.seconds  # the report's own writing (UMAPs) is the rest of the wall time
    with staged_dir(output) as folder:
        write_report(folder, report, embeddings, pca, data.labels, backends, progress=progress)
    return report
