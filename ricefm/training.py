"""The pretraining loop both backends run: one contract, one skeleton, backend-specific steps.

``python -m ricefm_npu.train`` and ``python -m ricefm_jax.train`` take the same flags
(:func:`define_flags`), plan the same steps (:class:`Plan`), start from the same initial weights
(``ricefm.init``), validate on the same batches (:func:`validation_batches`), log the same
metrics with the same meaning (:class:`TrainLog`), keep the best weights by the same rule and
check a resume the same way (:func:`run`). A backend supplies only a :class:`Steps` object: its
optimizer step, its evaluation of one batch, a cross-process sum, and save / restore / export.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ricefm.atomic import staged_dir, write_bytes_atomic, write_json_atomic
from ricefm.batching import (BATCHING, BatchStream, TokenSpec, collate_generative, split_cells, steps_per_epoch,
                             token_budget_batches)
from ricefm.dropout import MASKS
from ricefm.errors import RiceFMInputError, did_you_mean
from ricefm.host_memory import apply_host_memory, check_host_memory
from ricefm.init import initial_state
from ricefm.locks import ExclusiveLock
from ricefm.shards import ShardedCells
from ricefm.vocab import GeneVocab

LOSS_NAMES = ("total", "mse", "mvc", "gen")
METRICS = "metrics.jsonl"
# the arrays of a generative batch a training step consumes (the rest is bookkeeping: epoch, step, cell ids)
BATCH_INPUTS = ("pcpt_gene_ids", "pcpt_values", "pcpt_key_padding_mask", "gen_gene_ids", "gen_target_values",
                "gen_key_padding_mask", "mod_types")
BEST = "best"
LOCK = "run.lock"


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


def open_training_data(cfg: ml_collections.ConfigDict, share: tuple[int, int] = (0, 1)) -> TrainingData:
    """The config's dataset, its batch tokens and its seeded train/validation split.

    Every digest of this process's ``share`` (rank, world) of a local dataset's shards is checked
    first, so a damaged dataset stops the run before it writes anything (in an object store:
    every object's presence and the metadata digests).
    """
    if not cfg.data.data_dir:
        raise RiceFMInputError("no data: pass --data DIR (a dataset built by `ricefm build-data`)")
    ds = ShardedCells(cfg.data.data_dir)
    if not ds.location.remote:  # over a network this would read the whole share first; chunks carry CRC32Cs
        ds.verify(share)
    tokens = TokenSpec(pad_id=ds.vocab.pad_id, cls_id=ds.vocab.cls_id, pad_value=cfg.model.pad_value)
    return TrainingData(ds, tokens, *split_cells(len(ds), cfg.data.valid_fraction, cfg.data.seed))


def check_settings(cfg: ml_collections.ConfigDict) -> None:
    """Settings that cannot train stop here with the field and the fix, before any work."""
    checks = [("data.batch_size", cfg.data.batch_size, 1), ("data.eval_batch_size", cfg.data.eval_batch_size, 1),
              ("optim.grad_accum_steps", cfg.optim.grad_accum_steps, 1), ("train.log_every", cfg.train.log_every, 1),
              ("train.checkpoint_every", cfg.train.checkpoint_every, 1), ("train.max_steps", cfg.train.max_steps, 0),
              ("train.stop_at_step", cfg.train.stop_at_step, 0), ("data.length_step", cfg.data.length_step, 1),
              ("data.read_block_cells", cfg.data.get("read_block_cells", 1), 1)]
    if not cfg.train.max_steps:  # the epochs count the steps only when max_steps does not
        checks.append(("train.epochs", cfg.train.epochs, 1))
    for name, value, least in checks:
        if int(value) < least:
            raise RiceFMInputError(f"--config.{name}={value}: must be at least {least}")
    ratios = tuple(float(r) for r in cfg.data.gen_ratios)
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise RiceFMInputError(f"--config.data.gen_ratios={ratios}: fractions strictly between 0 and 1")
    shortest = 1 + math.ceil(1 / min(ratios))  # gen length int((L - 1) r) must be at least one token
    if int(cfg.data.max_seq_len) < shortest:
        raise RiceFMInputError(f"--config.data.max_seq_len={cfg.data.max_seq_len}: leaves no gen token at gen ratio "
                               f"{min(ratios)}; use at least {shortest}")
    if cfg.model.get("dropout_masks", "fast") not in MASKS:
        raise RiceFMInputError(f"--config.model.dropout_masks={cfg.model.dropout_masks!r}: choose one of {', '.join(MASKS)}")
    if cfg.data.batching not in BATCHING:
        raise RiceFMInputError(f"--config.data.batching={cfg.data.batching!r}: choose one of {', '.join(BATCHING)}")
    budget = int(cfg.data.get("tokens_per_batch", 0))
    if budget < 0 or (budget and budget < int(cfg.data.max_seq_len)):
        raise RiceFMInputError(f"--config.data.tokens_per_batch={budget}: 0 (batches of data.batch_size cells) or at "
                               f"least data.max_seq_len ({cfg.data.max_seq_len}), so that a full-length cell fits")
    if budget and cfg.data.batching != "bucketed":
        raise RiceFMInputError(f"--config.data.tokens_per_batch={budget} needs --config.data.batching=bucketed")
    check_host_memory(cfg.train.get("host_memory", "keep"))
    if cfg.optim.schedule != "cosine":
        raise RiceFMInputError(f"--config.optim.schedule={cfg.optim.schedule!r}: only 'cosine' (with warmup) is supported")


def cosine_with_warmup(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0, then cosine decay to 0 (the published schedule)."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass(frozen=True)
class Plan:
    """What a run does: its data, its process's share, and how many optimizer steps."""

    cfg: ml_collections.ConfigDict
    workdir: Path
    data: TrainingData
    rank: int
    world_size: int
    batch_per_process: int  # cells per micro-batch in this process (all its devices)
    total_steps: int
    stop_at: int
    lock: ExclusiveLock | None = None  # the main process's hold on the workdir

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    @property
    def vocab(self) -> GeneVocab:
        return self.data.cells.vocab

    @property
    def main(self) -> bool:
        return self.rank == 0

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based), as both backends apply it."""
        return float(self.cfg.optim.lr) * cosine_with_warmup(self.total_steps, self.cfg.optim.warmup_fraction)(step)

    def initial_state(self) -> dict[str, np.ndarray]:
        """The published initial weights for this config and vocabulary (``ricefm.init``)."""
        return initial_state(self.cfg.model, len(self.vocab), int(self.cfg.train.seed))

    def check_vocab(self, vocab: GeneVocab, source: str) -> None:
        if vocab.sha256() != self.vocab.sha256():
            raise RiceFMInputError(f"{source}: its vocabulary differs from the dataset's ({self.cfg.data.data_dir}/"
                                   "vocab.json); rebuild the shards with --vocab from the checkpoint")


def plan(cfg: ml_collections.ConfigDict, workdir: str | Path, rank: int, world_size: int,
         batch_per_process: int) -> Plan:
    """Check the settings, open (and verify) the data, count the steps, then make and lock the workdir.

    The returned plan holds the workdir's lock; the trainer releases it (:meth:`Plan.release`).
    """
    check_settings(cfg)
    workdir = Path(workdir).resolve()
    data = open_training_data(cfg, (rank, world_size))
    accum = int(cfg.optim.grad_accum_steps)
    budget = int(cfg.data.get("tokens_per_batch", 0))
    epochs = 1 if cfg.train.max_steps else int(cfg.train.epochs)
    if budget:  # how many batches an epoch makes depends on its order: count each epoch's
        lengths = data.cells.lengths()[data.train_cells]
        devices = world_size * (batch_per_process // int(cfg.data.batch_size))
        micro = [len(token_budget_batches(lengths, int(cfg.data.seed), e, budget, devices, int(cfg.data.max_seq_len),
                                          int(cfg.data.length_step), block=int(cfg.data.get("read_block_cells", 1))))
                 for e in range(epochs)]
        unit = f"batches of {budget} tokens a device"
    else:
        micro = [steps_per_epoch(len(data.train_cells), batch_per_process, world_size)] * epochs
        unit = f"batches of {batch_per_process} per process"
    if min(micro) < accum:
        raise RiceFMInputError(f"{cfg.data.data_dir}: {len(data.train_cells)} training cells make fewer than {accum} "
                               f"{unit}; lower --config.data.batch_size or --config.data.tokens_per_batch")
    total = int(cfg.train.max_steps) or sum(m // accum for m in micro)
    stop_at = min(total, int(cfg.train.stop_at_step) or total)
    lock = None
    if rank == 0:  # every check passed: now the workdir is made, and held against a second run
        check_workdir(workdir)
        lock = ExclusiveLock(workdir / LOCK, f"--workdir {workdir}").acquire()
    return Plan(cfg, workdir, data, rank, world_size, batch_per_process, total, stop_at, lock)


def validation_batches(p: Plan) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the validation batches.

    The validation cells, in order, are cut into batches of ``eval_batch_size`` (the last one may
    be smaller), batch b with gen ratio ``gen_ratios[b % len]`` and the split of epoch 0; process r
    takes batches r, r + world, ... So every cell counts, and the batches do not depend on the
    backend or the number of processes.
    """
    cfg, cells, bs = p.cfg, p.data.valid_cells, int(p.cfg.data.eval_batch_size)
    ratios = tuple(cfg.data.gen_ratios)
    for b, lo in enumerate(range(0, len(cells), bs)):
        if b % p.world_size == p.rank:
            yield collate_generative(p.data.cells.read(cells[lo:lo + bs]), p.data.tokens, cfg.data.max_seq_len,
                                     ratios[b % len(ratios)], seed=cfg.data.seed, epoch=0)


class Steps(Protocol):
    """What a backend supplies to :func:`run`."""

    description: str  # e.g. "torch 2.13.0 on cpu x1, math attention, fp32"

    def step(self, micro_batches: Sequence[dict[str, np.ndarray]], step: int, cell_emb_pass: bool
             ) -> tuple[np.ndarray, float]:
        """One optimizer step over the micro-batches: (losses in LOSS_NAMES order, averaged over the
        micro-batches and all processes; the norm of the gradient the update applied, before clipping)."""

    def eval_losses(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Losses (LOSS_NAMES order) of one validation batch, eval mode, cell-embedding pass on."""

    def sum_across(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over all processes (float64)."""

    def save(self, meta: dict[str, Any]) -> None:
        """Keep weights, optimizer state and ``meta`` so that :meth:`restore` continues exactly."""

    def restore(self) -> dict[str, Any] | None:
        """Load the latest :meth:`save`; its ``meta``, or None when there is none."""

    def export(self, folder: Path) -> None:
        """The current weights as a published riceFM checkpoint in the empty ``folder``."""

    def summary(self) -> dict[str, Any]:
        """Backend facts for the run summary (device, attention, ...)."""


def config_fingerprint(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """What must not change across a resume (stopping early may)."""
    keep = cfg.to_dict()
    keep["train"] = {k: v for k, v in keep["train"].items() if k != "stop_at_step"}
    return json.loads(json.dumps(keep, default=str))


def next_position(batch: dict[str, np.ndarray], steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, step) of the batch after ``batch`` in the stream."""
    epoch, step = int(batch["epoch"]), int(batch["step"]) + 1
    return (epoch + 1, 0) if step == steps_per_epoch else (epoch, step)


def token_counts(batch: dict[str, np.ndarray]) -> np.ndarray:
    """(real tokens, token positions computed) of a generative batch, both streams."""
    pads = (batch["pcpt_key_padding_mask"], batch["gen_key_padding_mask"])
    return np.array([sum(int((~m).sum()) for m in pads), sum(m.size for m in pads)], np.float64)


class TrainLog:
    """Per-step records; every ``log_every`` steps, rates over the window since the last log, a
    TensorBoard scalar each (``train/...``) and a metrics.jsonl line.

    Metrics: ``loss_{total,mse,mvc,gen}``, ``lr`` (of the step), ``grad_norm`` (of the gradient the
    update applied, before clipping), ``cells_per_s`` and ``tokens_per_s`` (non-padding tokens of
    both streams, all processes), ``padding_fraction`` (share of computed positions that are padding).
    ``writer`` is any SummaryWriter with ``add_scalar``, None off the main process.
    """

    def __init__(self, workdir: Path, writer, log_every: int, sum_across: Callable[[np.ndarray], np.ndarray]):
        self.workdir, self.writer, self.log_every, self.sum_across = workdir, writer, log_every, sum_across
        self.history: list[dict[str, float]] = []
        self._t, self._cells, self._tokens = time.perf_counter(), 0, np.zeros(2)

    def step(self, step: int, losses: np.ndarray, lr: float, grad_norm: float, cells: int, tokens: np.ndarray,
             last: bool) -> dict:
        self._cells += cells
        self._tokens = self._tokens + tokens
        record = {"step": step, **{f"loss_{n}": float(losses[i]) for i, n in enumerate(LOSS_NAMES)},
                  "lr": float(lr), "grad_norm": float(grad_norm)}
        self.history.append(record)
        if step % self.log_every == 0 or last:
            real, positions = self.sum_across(self._tokens)  # every process logs at the same steps
            dt = time.perf_counter() - self._t
            record.update(cells_per_s=self._cells / dt, tokens_per_s=float(real) / dt,
                          padding_fraction=1.0 - float(real) / max(float(positions), 1.0))
            self._t, self._cells, self._tokens = time.perf_counter(), 0, np.zeros(2)
            if self.writer is not None:
                for k, v in record.items():
                    if k != "step":
                        self.writer.add_scalar(f"train/{k}", v, step)
                with open(self.workdir / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
        return record

    def validation(self, step: int, losses: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in losses.items():
                self.writer.add_scalar(f"valid/loss_{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def trim_metrics(path: Path, step: int) -> None:
    """Drop the log lines after ``step``: a resumed run logs those steps again, each must appear once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut by the kill
            continue
    if kept != lines:
        write_bytes_atomic(path, "".join(f"{line}\n" for line in kept).encode())


def validate(p: Plan, steps: Steps) -> dict[str, float]:
    """Mean validation losses over all validation batches (see :func:`validation_batches`)."""
    sums = np.zeros(len(LOSS_NAMES) + 1)
    for batch in validation_batches(p):
        sums[:-1] += np.asarray(steps.eval_losses(batch), np.float64)
        sums[-1] += 1
    sums = steps.sum_across(sums)
    return {n: float(sums[i] / sums[-1]) for i, n in enumerate(LOSS_NAMES)} if sums[-1] > 0 else {}


def run(p: Plan, steps: Steps, resume: bool, make_writer: Callable[[str], Any], prefetch_stream: bool = True,
        pad_to_max: bool = False, progress: bool = True, name: str = "ricefm") -> dict[str, Any]:
    """The training loop: resume check, batches, steps, logging, validation, checkpoints, best export.

    Validation runs at every checkpoint (every ``train.checkpoint_every`` steps and at the end);
    ``OUT/best`` is exported when the validation loss improves (or at every checkpoint when there
    are no validation cells).
    """
    cfg = p.cfg
    step, epoch, micro, best = 0, 0, 0, math.inf
    if resume:
        meta = steps.restore()
        if meta is None:
            raise RiceFMInputError(f"--resume: no checkpoint in {p.workdir / 'checkpoints'}; start without --resume")
        if meta["config"] != config_fingerprint(cfg):
            raise RiceFMInputError(f"--resume: the config differs from the one {p.workdir} was trained with; "
                                   "resume with the same --config and overrides")
        if meta["vocab_sha256"] != p.vocab.sha256():
            raise RiceFMInputError(f"--resume: {p.workdir} was trained on another vocabulary than {cfg.data.data_dir}")
        step, epoch, micro, best = meta["step"], meta["epoch"], meta["micro"], meta["best_valid"]
        if p.main:
            trim_metrics(p.workdir / METRICS, step)

    writer = None
    if p.main:
        writer = make_writer(str(p.workdir / "tensorboard"))
        write_json_atomic(p.workdir / "config.json", cfg.to_dict())
    log = TrainLog(p.workdir, writer, int(cfg.train.log_every), steps.sum_across)

    def checkpoint() -> None:
        nonlocal best
        valid = validate(p, steps) if len(p.data.valid_cells) else {}
        log.validation(step, valid)
        improved = bool(valid) and valid["total"] < best
        if improved:
            best = valid["total"]
        steps.save({"step": step, "epoch": epoch, "micro": micro, "best_valid": best,
                    "vocab_sha256": p.vocab.sha256(), "config": config_fingerprint(cfg)})
        if p.main and (improved or not len(p.data.valid_cells)):  # no validation cells: the latest is the best known
            with staged_dir(p.workdir / BEST) as folder:
                steps.export(folder)

    accum = int(cfg.optim.grad_accum_steps)
    stream = BatchStream(p.data.cells, p.data.tokens, p.batch_per_process, cfg.data.max_seq_len, cfg.data.gen_ratios,
                         cfg.data.seed, rank=p.rank, world_size=p.world_size, start_epoch=epoch, start_step=micro,
                         prefetch=cfg.data.prefetch, cells=p.data.train_cells, num_workers=cfg.data.num_workers,
                         pad_to_max=pad_to_max, batching=cfg.data.batching, length_step=cfg.data.length_step,
                         accum=accum, tokens_per_batch=int(cfg.data.get("tokens_per_batch", 0)),
                         devices_per_rank=p.batch_per_process // int(cfg.data.batch_size),
                         read_block_cells=int(cfg.data.get("read_block_cells", 1)))
    batches = iter(stream)
    bar = tqdm(total=p.total_steps, initial=step, unit="step", desc=name, disable=not (progress and p.main))
    try:
        while step < p.stop_at:
            micro_batches = [next(batches) for _ in range(accum)]
            epoch, micro = next_position(micro_batches[-1], stream.steps_in_epoch(int(micro_batches[-1]["epoch"])))
            losses, grad_norm = steps.step(micro_batches, step, step >= cfg.train.cell_emb_pass_after)
            lr = p.lr(step)
            step += 1
            record = log.step(step, losses, lr, grad_norm, sum(len(b["mod_types"]) for b in micro_batches) * p.world_size,
                              sum(token_counts(b) for b in micro_batches), last=step == p.stop_at)
            bar.set_postfix(loss=f"{record['loss_total']:.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            if step % cfg.train.checkpoint_every == 0 or step == p.stop_at:
                checkpoint()
    finally:
        bar.close()
        batches.close()
        log.close()
    return {"steps": step, "total_steps": p.total_steps, "history": log.history, "best_valid": best,
            "world_size": p.world_size, **steps.summary()}


def define_flags() -> dict[str, Any]:
    """The flags of both ``python -m ricefm_npu.train`` and ``python -m ricefm_jax.train``."""
    from absl import flags
    from ml_collections import config_flags

    from ricefm.precision import DEVICE_CHOICES

    return {
        "config": config_flags.DEFINE_config_file("config", None, "ml-collections config file, e.g. configs/ricefm_base.py"),
        "data": flags.DEFINE_string("data", None, "dataset from `ricefm build-data`: a folder or s3://, gs:// URL "
                                                  "(sets config.data.data_dir)"),
        "workdir": flags.DEFINE_string("workdir", None, "output folder for checkpoints, logs, TensorBoard"),
        "device": flags.DEFINE_enum("device", "auto", list(DEVICE_CHOICES),
                                    "auto: npu, then cuda, then cpu (torch); JAX's default platform (jax)"),
        "resume": flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in WORKDIR/checkpoints"),
    }


def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _leaf_names(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    names = []
    for k, v in cfg.items():
        names += _leaf_names(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [f"{prefix}{k}"]
    return names


def override_problem(argv: Sequence[str]) -> str | None:
    """The first ``--config.FIELD`` override naming no field of the config, as one line with the
    closest names (ml-collections would raise a long traceback); None when all exist."""
    import importlib.util

    path = _config_path(argv)
    if path is None:
        return "--config is required (e.g. --config configs/ricefm_base.py)"
    file, _, arg = path.partition(":")
    if not Path(file).is_file():
        return f"--config {file}: no such file (e.g. configs/ricefm_base.py, configs/tiny.py)"
    spec = importlib.util.spec_from_file_location("_ricefm_config_check", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
    names = _leaf_names(cfg)
    for a in argv:
        if not a.startswith("--config."):
            continue
        field = a[len("--config."):].split("=", 1)[0]
        if field in names or any(n.startswith(field + ".") for n in names):
            continue
        groups = sorted({n.split(".")[0] + ".*" for n in names})
        hint = did_you_mean(field, names, "--config.")
        if not hint.startswith("did"):
            hint = f"fields: {', '.join(groups)}"
        return f"--config.{field}: {file} has no such field; {hint}"
    return None


def launch(train: Callable[..., dict[str, Any]]) -> None:
    """The trainers' ``__main__``: flags, a one-line check of ``--config.`` overrides, then :func:`main`."""
    import sys

    from absl import app

    flag_values = define_flags()
    problem = override_problem(sys.argv[1:])
    if problem is not None:
        print(f"{Path(sys.argv[0]).parent.name}.{Path(sys.argv[0]).stem}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    app.run(lambda argv: main(flag_values, train))


def main(flag_values: dict[str, Any], train: Callable[..., dict[str, Any]]) -> None:
    """Run ``train(cfg, workdir, device, resume)`` from the flags; bad input is one usage line."""
    from absl import app, logging

    logging.set_verbosity(logging.WARNING)  # orbax and jax log every file operation / platform probe at INFO
    if flag_values["config"].value is None or flag_values["workdir"].value is None:
        raise app.UsageError("--config and --workdir are required", exitcode=2)
    cfg = flag_values["config"].value
    if flag_values["data"].value:
        cfg.data.data_dir = flag_values["data"].value
    try:
        apply_host_memory(cfg.train.get("host_memory", "keep"))  # before JAX or torch start their threads
        summary = train(cfg, flag_values["workdir"].value, device=flag_values["device"].value,
                        resume=flag_values["resume"].value)
    except RiceFMInputError as e:
        raise app.UsageError(str(e), exitcode=2) from None
    if summary["history"] and summary.get("main", True):
        last = summary["history"][-1]
        print(f"done: {summary['steps']}/{summary['total_steps']} steps, {summary['description']}; last loss "
              f"{last['loss_total']:.4f}; best valid {summary['best_valid']:.4f}")
