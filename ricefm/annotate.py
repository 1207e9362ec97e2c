"""Cell-type annotation of a query h5ad with a fine-tuned checkpoint: ``ricefm annotate``.

The query is streamed in row blocks like ``ricefm embed`` and tokenized exactly as the reference
was for fine-tuning (same length and gene selection, from the checkpoint's record). Per cell: the
class probabilities (softmax of the head's logits), the most probable class with its probability
as the confidence, "unassigned" below ``min_confidence``, and the fine-tuned encoder's embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ricefm.backends import Classifier, get_backend
from ricefm.batching import TokenSpec
from ricefm.cells import TokenizedCells
from ricefm.embed import (BLOCK_CELLS, LENGTH_MULTIPLE, OBSM_KEY, check_embed_settings, check_output_file,
                          write_h5ad_additions)
from ricefm.errors import RiceFMInputError
from ricefm.gene_maps import load_gene_map
from ricefm.shards.gene_space import VocabMapping, modality_codes, translated_genes
from ricefm.shards.sources import H5adSource

UNASSIGNED = "unassigned"
LABEL, CONFIDENCE, PROBA = "ricefm_label", "ricefm_confidence", "ricefm_proba"


def load_classifier(backend: str, checkpoint: str | Path, device: str = "auto") -> Classifier:
    """The named backend's classifier for a fine-tuned ``checkpoint`` (through ``ricefm.backends``)."""
    return get_backend(backend).load_classifier(checkpoint, device=device)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


@dataclass
class Prediction:
    proba: np.ndarray  # (cells, classes) float32
    embedding: np.ndarray  # (cells, d_model) float32
    class_names: list[str]
    min_confidence: float

    @property
    def best(self) -> np.ndarray:
        return self.proba.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return self.proba.max(1)

    @property
    def labels(self) -> np.ndarray:
        """Predicted class names, ``unassigned`` where the confidence is below the threshold."""
        names = np.asarray(self.class_names, dtype=object)[self.best]
        names[self.confidence < self.min_confidence] = UNASSIGNED
        return names


def classify_h5ad(classifier: Classifier, src: H5adSource, mapping: VocabMapping, modality: np.ndarray,
                  batch_size: int, max_seq_len: int, selection: str, min_confidence: float,
                  progress: bool = True) -> Prediction:
    names = list(classifier.finetune["class_names"])
    tokens = TokenSpec(classifier.vocab.pad_id, classifier.vocab.cls_id, float(classifier.model_config.pad_value))
    proba = np.zeros((src.n_obs, len(names)), np.float32)
    emb = np.zeros((src.n_obs, int(classifier.model_config.d_model)), np.float32)
    with tqdm(total=src.n_obs, unit="cell", desc="annotate", disable=not progress) as bar:
        for lo in range(0, src.n_obs, BLOCK_CELLS):
            hi = min(lo + BLOCK_CELLS, src.n_obs)
            cells = TokenizedCells.from_mapped(mapping.apply(src.read_rows(lo, hi)), modality[lo:hi], index_offset=lo)
            by_length = np.argsort(np.minimum(cells.lengths, max_seq_len - 1), kind="stable")  # little padding
            for s in range(0, len(cells), batch_size):
                rows = by_length[s:s + batch_size]
                logits, e = classifier.classify(cells.batch(rows, tokens, max_seq_len, selection, LENGTH_MULTIPLE))
                proba[lo + rows], emb[lo + rows] = softmax(logits.astype(np.float64)), e
                bar.update(len(rows))
    return Prediction(proba, emb, names, float(min_confidence))


def write_annotation(input_path: Path, output_path: Path, pred: Prediction, info: dict[str, Any]) -> None:
    """The input file plus obs[ricefm_label, ricefm_confidence], obsm[ricefm_proba, X_ricefm] and
    uns[ricefm_annotation] (class names in probability-column order), swapped in when complete."""
    import anndata as ad
    import pandas as pd

    def add(f) -> None:
        obs = ad.io.read_elem(f["obs"])
        categories = [*pred.class_names, UNASSIGNED]
        obs[LABEL] = pd.Categorical(pred.labels, categories=categories)
        obs[CONFIDENCE] = pred.confidence.astype(np.float32)
        del f["obs"]
        ad.io.write_elem(f, "obs", obs)
        for group, key, value in (("obsm", PROBA, pred.proba), ("obsm", OBSM_KEY, pred.embedding),
                                  ("uns", "ricefm_annotation", {**info, "class_names": pred.class_names})):
            if key in f[group]:
                del f[group][key]
            ad.io.write_elem(f[group], key, value)

    write_h5ad_additions(input_path, output_path, add)


def annotate_h5ad(input_path: str | Path, output_path: str | Path, classifier: Classifier, batch_size: int = 64,
                  max_seq_len: int | None = None, min_confidence: float = 0.5, layer: str | None = None,
                  gene_column: str | None = None, gene_map: str | None = None, modality: str = "scrna",
                  min_gene_fraction: float = 0.1, label_key: str | None = None, progress: bool = True
                  ) -> tuple[Prediction, dict[str, Any], np.ndarray | None]:
    """Annotate every cell of ``input_path`` into ``output_path``; (prediction, info, true labels or None)."""
    input_path, output_path = Path(input_path), Path(output_path)
    check_embed_settings(batch_size, max_seq_len)
    check_output_file(input_path, output_path)
    if not 0 <= float(min_confidence) <= 1:
        raise RiceFMInputError(f"--min-confidence {min_confidence}: a probability between 0 and 1")
    record = classifier.finetune
    max_seq_len = int(max_seq_len or record["settings"]["max_seq_len"])
    selection = str(record["settings"]["selection"])
    src = H5adSource.open(input_path, layer=layer, gene_column=gene_column)
    try:
        truth = None
        if label_key is not None:
            column = src.obs_column(label_key, "--label-key")
            truth = np.asarray([None if v is None or v != v else str(v) for v in column.astype(object)], dtype=object)
        genes, n_by_table = translated_genes(src, load_gene_map(gene_map) if gene_map else None)
        mapping = VocabMapping.build(src, genes, classifier.vocab, min_gene_fraction, gene_column, gene_map, n_by_table)
        pred = classify_h5ad(classifier, src, mapping, modality_codes(src, modality), batch_size, max_seq_len,
                             selection, min_confidence, progress)
    finally:
        src.close()
    info = {"backend": classifier.description, "checkpoint_vocab_sha256": classifier.vocab.sha256(),
            "max_seq_len": max_seq_len, "selection": selection, "min_confidence": float(min_confidence),
            "cells": src.n_obs, "unassigned": int((pred.labels == UNASSIGNED).sum()),
            "reference_label_key": record.get("label_key", ""), **mapping.stats}
    write_annotation(input_path, output_path, pred, info)
    return pred, info, truth


def score_against_labels(pred: Prediction, truth: np.ndarray) -> dict[str, Any]:
    """Accuracy / macro-F1 of the most probable class on the query cells whose label is one of the
    checkpoint's classes (others are counted, not scored), and the share left unassigned."""
    from ricefm.evaluate.annotation import classification_metrics

    index = {c: i for i, c in enumerate(pred.class_names)}
    known = np.asarray([t in index for t in truth])
    if not known.any():
        raise RiceFMInputError(f"--label-key: no query cell has a label among the checkpoint's classes "
                               f"({', '.join(pred.class_names[:8])}{', ...' if len(pred.class_names) > 8 else ''})")
    y = np.asarray([index[t] for t in truth[known]])
    metrics = classification_metrics(y, pred.best[known], pred.class_names)
    unseen = sorted({str(t) for t in truth[~known] if t is not None})
    return {**metrics, "cells_scored": int(known.sum()), "cells_not_scored": int((~known).sum()),
            "labels_not_in_checkpoint": unseen,
            "unassigned_fraction": float((pred.confidence[known] < pred.min_confidence).mean())}
