"""Cell-type annotation by fine-tuning: everything that is not backend-specific.

A backend provides a :class:`Finetuner` (a fresh model = checkpoint encoder + a given head; a
train step; logits). This module owns the rest, so both backends are trained and scored
identically: the stratified split, the class weights, the head's initial weights (drawn here
from the seed, the same numbers for torch and Flax), the batches, the epoch loop with early
stopping on validation macro-F1, the metrics, and a logistic-regression probe baseline.
"""

from __future__ import annotations

import ast
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import ml_collections
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ricefm.backends import Finetuner, get_backend
from ricefm.batching import BATCHING, TokenSpec, bucketed_order
from ricefm.cells import TokenizedCells
from ricefm.errors import RiceFMInputError, did_you_mean

METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1")


def annotation_config(overrides: Sequence[str] = (), flag: str = "--annotation") -> ml_collections.ConfigDict:
    """The shipped ``configs/annotation.py`` with ``KEY=VALUE`` overrides (Python literals;
    ``seeds=0,1,2``, ``freeze_encoder=true``); ``flag`` names the option in errors."""
    from ricefm_configs import annotation

    cfg = annotation.get_config()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise RiceFMInputError(f"{flag} {item!r}: expected KEY=VALUE with KEY one of {', '.join(cfg)}")
        if key not in cfg:
            raise RiceFMInputError(f"{flag} {item!r}: configs/annotation.py has no field {key!r}; "
                                   f"{did_you_mean(key, list(cfg))}")
        raw = {"true": "True", "false": "False"}.get(raw.strip().lower(), raw)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if isinstance(cfg[key], tuple) and not isinstance(value, tuple):
            value = (value,)
        try:
            cfg[key] = value
        except TypeError:
            raise RiceFMInputError(f"{flag} {item!r}: {key} takes a {type(cfg[key]).__name__} "
                                   f"(now {cfg[key]!r})") from None
    return cfg


def validate_config(cfg: ml_collections.ConfigDict, flag: str = "--annotation") -> None:
    """Fail before any embedding or training on settings that cannot work."""
    problems = []
    if len(cfg.split) != 3 or min(cfg.split) <= 0 or abs(sum(cfg.split) - 1) > 1e-6:
        problems.append(f"split={tuple(cfg.split)} needs three positive fractions summing to 1")
    if cfg.class_weighting not in ("balanced", "none"):
        problems.append(f"class_weighting={cfg.class_weighting!r} is not balanced or none")
    if not cfg.seeds:
        problems.append("seeds is empty")
    if cfg.batching not in BATCHING:
        problems.append(f"batching={cfg.batching!r} is not one of {', '.join(BATCHING)}")
    if not 0 < float(cfg.valid_fraction) < 1:
        problems.append(f"valid_fraction={cfg.valid_fraction} must be strictly between 0 and 1")
    if int(cfg.max_seq_len) == 1 or int(cfg.max_seq_len) < 0:
        problems.append(f"max_seq_len={cfg.max_seq_len} must be 0 (the checkpoint's training length) or at least 2")
    for key, low in (("batch_size", 1), ("max_epochs", 1), ("patience", 1), ("min_cells_per_class", 3)):
        if int(cfg[key]) < low:
            problems.append(f"{key}={cfg[key]} must be at least {low}")
    if problems:
        raise RiceFMInputError(f"{flag}: " + "; ".join(problems))


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def stratified_split(y: np.ndarray, fractions: Sequence[float], seed: int) -> Split:
    """Per class: shuffle by (seed, class) and cut into train/valid/test by ``fractions``, every
    class getting at least one validation and one test cell (so each part has every class)."""
    f_train, f_valid, f_test = (float(f) for f in fractions)
    if min(f_train, f_valid, f_test) <= 0 or abs(f_train + f_valid + f_test - 1) > 1e-6:
        raise RiceFMInputError(f"split {tuple(fractions)}: need three positive fractions summing to 1")
    parts: dict[str, list[np.ndarray]] = {"train": [], "valid": [], "test": []}
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < 3:
            raise RiceFMInputError(f"class {c} has {len(members)} cell(s); a train/validation/test split needs 3")
        members = members[_rng(seed, int(c), 0x5A17).permutation(len(members))]
        n_test = max(1, int(round(len(members) * f_test)))
        n_valid = max(1, min(int(round(len(members) * f_valid)), len(members) - n_test - 1))
        parts["test"].append(members[:n_test])
        parts["valid"].append(members[n_test:n_test + n_valid])
        parts["train"].append(members[n_test + n_valid:])
    return Split(**{k: np.sort(np.concatenate(v)) for k, v in parts.items()})


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) rows: per class, shuffled by (seed, class), ``fraction`` of it (at least
    one cell, and never all) held out, so validation has every class."""
    if not 0 < float(fraction) < 1:
        raise RiceFMInputError(f"valid_fraction={fraction}: a fraction strictly between 0 and 1")
    train, valid = [], []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < 2:
            raise RiceFMInputError(f"class {c} has {len(members)} cell; a train/validation split needs 2")
        members = members[_rng(seed, int(c), 0x7A11D).permutation(len(members))]
        n_valid = min(max(1, int(round(len(members) * float(fraction)))), len(members) - 1)
        valid.append(members[:n_valid])
        train.append(members[n_valid:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(valid))


def eligible_classes(labels: pd.Series, min_cells: int) -> tuple[list[str], dict[str, int]]:
    """Cell types with at least ``min_cells`` cells (kept), and the rest with their counts."""
    counts = labels.value_counts()
    kept = sorted(str(c) for c, n in counts.items() if n >= min_cells)
    dropped = {str(c): int(n) for c, n in counts.items() if n < min_cells}
    if len(kept) < 2:
        raise RiceFMInputError(f"only {len(kept)} cell type(s) have at least {min_cells} cells; annotation needs 2 "
                               "(lower --annotation min_cells_per_class=N, pass --no-annotation, or use more cells)")
    return kept, dropped


def class_weights(y_train: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """Cross-entropy weights per class: ``balanced`` = n / (k * n_c) (sklearn's formula), or ones."""
    if mode == "none":
        return np.ones(n_classes, np.float32)
    if mode != "balanced":
        raise RiceFMInputError(f"class_weighting={mode!r}: choose balanced or none")
    counts = np.bincount(y_train, minlength=n_classes).astype(np.float64)
    return (len(y_train) / (n_classes * np.maximum(counts, 1))).astype(np.float32)


def init_head(d_model: int, n_classes: int, n_layers: int, seed: int) -> dict[str, np.ndarray]:
    """The classification head's initial weights, torch-named and torch-laid-out, drawn from the seed
    with torch's default Linear init (U(+-1/sqrt(fan_in)) for weight and bias), LayerNorm 1 / 0."""
    rng = _rng(seed, 0xC1A55)
    bound = 1.0 / math.sqrt(d_model)
    head: dict[str, np.ndarray] = {}

    def linear(name: str, n_out: int) -> None:
        head[f"{name}.weight"] = rng.uniform(-bound, bound, (n_out, d_model)).astype(np.float32)
        head[f"{name}.bias"] = rng.uniform(-bound, bound, n_out).astype(np.float32)

    for i in range(n_layers - 1):
        linear(f"cls_decoder._decoder.{3 * i}", d_model)
        head[f"cls_decoder._decoder.{3 * i + 2}.weight"] = np.ones(d_model, np.float32)
        head[f"cls_decoder._decoder.{3 * i + 2}.bias"] = np.zeros(d_model, np.float32)
    linear("cls_decoder.out_layer", n_classes)
    return head


def lr_factor(step, steps_per_epoch: int, decay: float):
    """Learning-rate multiplier: ``decay`` per finished epoch (works on ints and on jax arrays)."""
    return decay ** (step // steps_per_epoch)


def weighted_cross_entropy(logits: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    """torch's ``cross_entropy(weight=w)``: sum(w_y * nll) / sum(w_y)."""
    z = logits - logits.max(1, keepdims=True)
    nll = np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]
    w = weights[y]
    return float((w * nll).sum() / w.sum())


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro precision / recall / F1, a per-class table and the confusion matrix
    (rows = true class, columns = predicted), over all ``class_names`` even if absent."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = np.arange(len(class_names))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "macro_precision": float(p.mean()),
            "macro_recall": float(r.mean()), "macro_f1": float(f.mean()),
            "per_class": {str(c): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                   "support": int(s[i])} for i, c in enumerate(class_names)},
            "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist()}


def load_finetuner(backend: str, checkpoint, device: str = "auto") -> Finetuner:
    """The named backend's fine-tuner for ``checkpoint`` on ``device`` (through ``ricefm.backends``)."""
    return get_backend(backend).load_finetuner(checkpoint, device=device)


class AnnotationRun:
    """Fine-tune one backend on tokenized cells with integer labels, one run per seed."""

    def __init__(self, finetuner: Finetuner, cells: TokenizedCells, y: np.ndarray, class_names: Sequence[str],
                 cfg: ml_collections.ConfigDict, progress: bool = True):
        self.ft, self.cells, self.y = finetuner, cells, np.asarray(y, np.int64)
        self.class_names, self.cfg, self.progress = list(class_names), cfg, progress
        self.tokens = TokenSpec(finetuner.vocab.pad_id, finetuner.vocab.cls_id, float(finetuner.model_config.pad_value))
        self.max_seq_len = int(cfg.max_seq_len or finetuner.model_config.get("max_seq_len", 1200))

    def _batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return self.cells.batch(rows, self.tokens, self.max_seq_len, self.cfg.selection, self.cfg.length_multiple)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Logits of ``rows`` in their order, batched by length (less padding)."""
        bs = int(self.cfg.batch_size)
        perm = np.argsort(self.cells.lengths[rows], kind="stable")
        logits = np.concatenate([self.ft.logits(self._batch(rows[perm[i:i + bs]])) for i in range(0, len(rows), bs)])
        out = np.empty_like(logits)
        out[perm] = logits
        return out

    def fit(self, train: np.ndarray, valid: np.ndarray, seed: int, desc: str) -> tuple[list[dict[str, Any]], int]:
        """Fine-tune from the checkpoint on ``train`` rows, one validation pass per epoch, stopping after
        ``patience`` epochs without a better validation macro-F1 (ties: lower loss); the model ends at
        its best epoch. (The epoch history, the best epoch.)"""
        cfg, y, n_classes = self.cfg, self.y, len(self.class_names)
        weights = class_weights(y[train], n_classes, cfg.class_weighting)
        bs = int(cfg.batch_size)
        head = init_head(int(self.ft.model_config.d_model), n_classes, int(self.ft.model_config.get("n_layers_cls", 3)),
                         seed)
        self.ft.start(head, n_classes, cfg, -(-len(train) // bs), seed)
        history, best, best_snapshot, stale = [], (-1.0, math.inf), None, 0
        bar = tqdm(range(int(cfg.max_epochs)), desc=desc, unit="epoch", disable=not self.progress)
        for epoch in bar:
            if cfg.batching == "bucketed":  # similar lengths per batch, as in pretraining
                order = train[bucketed_order(self.cells.lengths[train], seed, epoch, bs)]
            else:
                order = train[_rng(seed, epoch, 0x7EA1).permutation(len(train))]
            t0 = time.perf_counter()
            losses = [self.ft.train_step(self._batch(order[i:i + bs]), y[order[i:i + bs]], weights)
                      for i in range(0, len(order), bs)]
            train_seconds = time.perf_counter() - t0
            val_logits = self.predict(valid)
            val_loss = weighted_cross_entropy(val_logits, y[valid], weights)
            val = classification_metrics(y[valid], val_logits.argmax(1), self.class_names)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "valid_loss": val_loss,
                            "valid_macro_f1": val["macro_f1"], "valid_accuracy": val["accuracy"],
                            "train_cells": len(order), "train_seconds": train_seconds})
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_f1=f"{val['macro_f1']:.3f}")
            if (val["macro_f1"], -val_loss) > (best[0], -best[1]):
                best, best_snapshot, stale = (val["macro_f1"], val_loss), self.ft.snapshot(), 0
            else:
                stale += 1
                if stale >= int(cfg.patience):
                    break
        self.ft.restore(best_snapshot)
        best_epoch = max(range(len(history)), key=lambda e: (history[e]["valid_macro_f1"], -history[e]["valid_loss"]))
        return history, best_epoch

    def run_seed(self, seed: int) -> dict[str, Any]:
        split = stratified_split(self.y, self.cfg.split, seed)
        history, best_epoch = self.fit(split.train, split.valid, seed, f"fine-tune seed {seed}")
        pred = self.predict(split.test).argmax(1)
        return {"seed": seed, "best_epoch": best_epoch, "epochs_run": len(history), "history": history,
                "valid_cells": len(split.valid), "test_cells": split.test.tolist(), "test_pred": pred.tolist(),
                **classification_metrics(self.y[split.test], pred, self.class_names)}

    def run(self) -> dict[str, Any]:
        return summarize([self.run_seed(int(s)) for s in self.cfg.seeds], self.class_names)


def probe_baseline(features: np.ndarray, y: np.ndarray, class_names: Sequence[str],
                   cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Logistic regression (class-balanced) on fixed features with the same splits and seeds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    runs = []
    for seed in cfg.seeds:
        split = stratified_split(y, cfg.split, int(seed))
        scaler = StandardScaler().fit(features[split.train])
        clf = LogisticRegression(max_iter=2000, class_weight="balanced" if cfg.class_weighting == "balanced" else None)
        clf.fit(scaler.transform(features[split.train]), y[split.train])
        pred = clf.predict(scaler.transform(features[split.test]))
        runs.append({"seed": int(seed), "test_cells": split.test.tolist(), "test_pred": pred.tolist(),
                     **classification_metrics(y[split.test], pred, class_names)})
    return summarize(runs, class_names)


def summarize(runs: list[dict[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Mean ± sd (ddof 1) of each metric and per-class F1 over seeds; summed confusion matrix."""
    def stats(values: list[float]) -> dict[str, float]:
        v = np.asarray(values, np.float64)
        return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

    return {"metrics": {m: stats([r[m] for r in runs]) for m in METRICS},
            "per_class_f1": {c: stats([r["per_class"][c]["f1"] for r in runs]) for c in class_names},
            "confusion_total": np.sum([r["confusion"] for r in runs], axis=0).tolist(),
            "seeds": runs}


def prediction_agreement(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Fraction of test cells (over all seeds) that two methods label the same."""
    same = total = 0
    for ra, rb in zip(a["seeds"], b["seeds"]):
        assert ra["test_cells"] == rb["test_cells"], "methods were scored on different splits"
        same += int(np.sum(np.asarray(ra["test_pred"]) == np.asarray(rb["test_pred"])))
        total += len(ra["test_pred"])
    return same / max(total, 1)


def confusion_png(panels: dict[str, np.ndarray], class_names: Sequence[str], path, title: str) -> None:
    """Row-normalized confusion matrices (true x predicted, summed over seeds), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    size = 2.5 + 0.32 * k
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (name, cm) in zip(axes[0], panels.items()):
        cm = np.asarray(cm, np.float64)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.6 else "black")
        ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), class_names if ax is axes[0][0] else [""] * k, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_title(name)
    axes[0][0].set_ylabel("true")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
