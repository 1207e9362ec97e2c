"""Backend-neutral pieces of the two trainers: workdir checks, the dataset and its train/validation
cells, the resume fingerprint, the data position after a batch, and the training log (TensorBoard
scalars + metrics.jsonl)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from ricefm.batching import TokenSpec, split_cells
from ricefm.errors import RiceFMInputError
from ricefm.shards import ShardedCells

LOSS_NAMES = ("total", "mse", "mvc", "gen")


def check_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RiceFMInputError(f"--workdir {workdir}: not writable ({e.strerror}); choose a writable folder") from None


@dataclass(frozen=True)
class TrainingData:
    cells: ShardedCells
    tokens: TokenSpec
    train_cells: np.ndarray
    valid_cells: np.ndarray


def open_training_data(cfg: ml_collections.ConfigDict, how_to_set_data: str) -> TrainingData:
    """The config's dataset, its batch tokens and its seeded train/validation split."""
    if not cfg.data.data_dir:
        raise RiceFMInputError(f"no data: {how_to_set_data} (a dataset built by `ricefm build-data`)")
    ds = ShardedCells(cfg.data.data_dir)
    tokens = TokenSpec(pad_id=ds.vocab.pad_id, cls_id=ds.vocab.cls_id, pad_value=cfg.model.pad_value)
    return TrainingData(ds, tokens, *split_cells(len(ds), cfg.data.valid_fraction, cfg.data.seed))


def config_fingerprint(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """What must not change across a resume (stopping early may)."""
    keep = cfg.to_dict()
    keep["train"] = {k: v for k, v in keep["train"].items() if k != "stop_at_step"}
    return json.loads(json.dumps(keep, default=str))


def next_position(batch: dict[str, np.ndarray], steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, step) of the batch after ``batch`` in the stream."""
    epoch, step = int(batch["epoch"]), int(batch["step"]) + 1
    return (epoch + 1, 0) if step == steps_per_epoch else (epoch, step)


class TrainLog:
    """Per-step records; every ``log_every`` steps: cells/s, TensorBoard scalars, a metrics.jsonl line.

    ``writer`` is any SummaryWriter with ``add_scalar`` (torch's or tensorboardX), None off the main
    process. Scalar names are the same for both backends.
    """

    def __init__(self, workdir: Path, writer, log_every: int):
        self.workdir, self.writer, self.log_every = workdir, writer, log_every
        self.history: list[dict[str, float]] = []
        self._t, self._cells = time.perf_counter(), 0

    def step(self, step: int, losses: np.ndarray, lr: float, grad_norm: float, cells: int, last: bool) -> dict:
        self._cells += cells
        record = {"step": step, **{f"loss_{n}": float(losses[i]) for i, n in enumerate(LOSS_NAMES)},
                  "lr": float(lr), "grad_norm": float(grad_norm)}
        self.history.append(record)
        if step % self.log_every == 0 or last:
            now = time.perf_counter()
            record["cells_per_s"] = self._cells / (now - self._t)
            self._t, self._cells = now, 0
            if self.writer is not None:
                for k, v in record.items():
                    if k != "step":
                        self.writer.add_scalar(f"train/{k}", v, step)
                with open(self.workdir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
        return record

    def validation(self, step: int, losses: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in losses.items():
                self.writer.add_scalar(f"valid/loss_{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
