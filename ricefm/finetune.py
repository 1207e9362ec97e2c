"""Fine-tuning a cell-type classifier on a labelled reference: ``ricefm finetune``.

The same protocol as the evaluation suite (``ricefm.evaluate.annotation``): the checkpoint's
encoder plus a fresh ``cls_decoder`` head, class-weighted cross-entropy, Adam decayed per epoch,
early stopping on validation macro-F1 with the best epoch kept. Here the validation part is a
class-stratified share of the reference (``valid_fraction``) and there is no test part: the
fine-tuned model is the product. This module returns its weights and the record that travels with
them (class names in head order, settings, validation metrics); ``converters`` writes the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from ricefm.backends import Finetuner
from ricefm.cells import TokenizedCells
from ricefm.embed import BLOCK_CELLS
from ricefm.errors import RiceFMInputError
from ricefm.evaluate import annotation as ann
from ricefm.gene_maps import load_gene_map
from ricefm.shards.gene_space import VocabMapping, modality_codes, translated_genes
from ricefm.shards.sources import H5adSource


@dataclass
class Reference:
    """The labelled cells a classifier learns from, tokenized, with integer labels into ``class_names``."""

    cells: TokenizedCells
    y: np.ndarray
    class_names: list[str]
    info: dict[str, Any]


def read_reference(path: str | Path, label_key: str, vocab, cfg: ml_collections.ConfigDict,
                   exclude_labels: Sequence[str] = (), layer: str | None = None, gene_column: str | None = None,
                   gene_map: str | None = None, modality: str = "scrna", min_gene_fraction: float = 0.1,
                   progress: bool = True) -> Reference:
    """Cells of ``path`` with a label (not excluded) of a class with at least ``min_cells_per_class``
    cells and at least one vocabulary gene; read in row blocks (only their non-zeros are kept)."""
    src = H5adSource.open(path, layer=layer, gene_column=gene_column)
    try:
        column = src.obs_column(label_key, "--label-key").astype(object)
        labels = pd.Series([None if v is None or v != v else str(v) for v in column], dtype=object)
        labelled = labels.notna().to_numpy() & ~labels.isin(list(exclude_labels)).to_numpy()
        if not labelled.any():
            raise RiceFMInputError(f"{path}: no cell has a label in obs[{label_key!r}] outside --exclude-labels")
        classes, rare = ann.eligible_classes(labels[labelled], int(cfg.min_cells_per_class))
        keep = labelled & labels.isin(classes).to_numpy()
        genes, n_by_table = translated_genes(src, load_gene_map(gene_map) if gene_map else None)
        mapping = VocabMapping.build(src, genes, vocab, min_gene_fraction, gene_column, gene_map, n_by_table)
        codes = modality_codes(src, modality)
        blocks = []
        with tqdm(total=src.n_obs, unit="cell", desc="read reference", disable=not progress) as bar:
            for lo in range(0, src.n_obs, BLOCK_CELLS):
                hi = min(lo + BLOCK_CELLS, src.n_obs)
                blocks.append(mapping.apply(src.read_rows(lo, hi))[np.flatnonzero(keep[lo:hi])])
                bar.update(hi - lo)
        mapped = sp.vstack(blocks, format="csr")
        rows = np.flatnonzero(keep)
        has_genes = np.diff(mapped.indptr) > 0
        mapped, rows = mapped[np.flatnonzero(has_genes)], rows[has_genes]
        y = np.searchsorted(classes, labels.to_numpy()[rows].astype(str))
        ann.eligible_classes(pd.Series(np.asarray(classes)[y]), int(cfg.min_cells_per_class))  # still 2 classes
    finally:
        src.close()
    info = {"path": str(Path(path).resolve()), "label_key": label_key, "cells": src.n_obs, "cells_used": int(len(rows)),
            "excluded_labels": list(exclude_labels), "classes_left_out": rare,
            "cells_without_vocab_genes": int((~has_genes).sum()),
            "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)}, **mapping.stats}
    return Reference(TokenizedCells.from_mapped(mapped, codes[rows]), y, list(classes), info)


def finetune(finetuner: Finetuner, ref: Reference, cfg: ml_collections.ConfigDict, progress: bool = True
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fine-tune on ``ref`` (seed ``cfg.seeds[0]``); the best epoch's weights and the checkpoint's record."""
    seed = int(cfg.seeds[0])
    run = ann.AnnotationRun(finetuner, ref.cells, ref.y, ref.class_names, cfg, progress)
    train, valid = ann.validation_split(ref.y, float(cfg.valid_fraction), seed)
    history, best_epoch = run.fit(train, valid, seed, "finetune")
    valid_metrics = ann.classification_metrics(ref.y[valid], run.predict(valid).argmax(1), ref.class_names)
    record = {
        "class_names": ref.class_names, "label_key": ref.info["label_key"], "reference": ref.info,
        "backend": finetuner.description, "seed": seed,
        "settings": {**cfg.to_dict(), "max_seq_len": run.max_seq_len},
        "train_cells": int(len(train)), "valid_cells": int(len(valid)), "best_epoch": best_epoch,
        "validation": {k: valid_metrics[k] for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1",
                                                     "per_class")},
        "history": history,
    }
    return finetuner.state_dict(), record
