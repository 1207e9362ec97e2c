"""Pretrain riceFM with torch on Ascend NPU, CUDA or CPU; data parallel under torchrun.

    python -m ricefm_npu.train --config configs/ricefm_base.py --data DIR --workdir OUT \
        [--device auto|npu|cuda|cpu] [--resume] [--config.train.epochs=5 ...]
    torchrun --nproc_per_node 8 -m ricefm_npu.train ...      # hccl on NPU, nccl on CUDA, gloo on CPU

Writes, atomically, ``OUT/checkpoints/latest`` (model.safetensors + config.json + vocab.json +
training_state.pt: optimizer, scheduler, grad scaler, RNG states, data position) every
``train.checkpoint_every`` steps and at the end, and ``OUT/best`` in the published format
(best_model.pt by validation loss, args.json, vocab.json). ``--resume`` continues from
``latest`` exactly as if never interrupted. TensorBoard scalars go to ``OUT/tensorboard`` and
every logged step to ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import torch
import torch.distributed as dist
from absl import app, flags
from ml_collections import config_flags
from tqdm.auto import tqdm

from ricefm.atomic import write_json_atomic
from ricefm.batching import BatchStream, TokenSpec, collate_generative, steps_per_epoch
from ricefm.errors import RiceFMInputError
from ricefm.shards import ShardedCells
from ricefm.training import (LOSS_NAMES, TrainLog, check_workdir, config_fingerprint, next_position,
                             open_training_data)
from ricefm_npu import devices
from ricefm_npu.checkpoints import load_torch_checkpoint, save_native, save_published, strict_load
from ricefm_npu.model import RiceFM
from ricefm_npu.objective import PretrainingObjective

STATE_FILE = "training_state.pt"


def cosine_with_warmup(total_steps: int, warmup_fraction: float):
    """LR multiplier: linear warmup from 0, then cosine decay to 0 (the published schedule)."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)).to(device, non_blocking=True) for k, v in batch.items()
            if k not in ("epoch", "step", "gen_prob", "cell_index")}


class _Distributed:
    """Rank/world/device for this process; torchrun's environment turns DDP on."""

    def __init__(self, device_name: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = devices.resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend=devices.ddp_backend(self.device))
        self.rank = dist.get_rank() if self.world_size > 1 else 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _validate(model: RiceFM, ds: ShardedCells, cells: np.ndarray, tokens: TokenSpec, cfg, env: _Distributed,
              autocast) -> dict[str, float]:
    """Mean validation losses over this rank's share of the validation cells, all-reduced."""
    mine = cells[env.rank::env.world_size]
    bs, ratios = cfg.data.eval_batch_size, tuple(cfg.data.gen_ratios)
    sums = torch.zeros(len(LOSS_NAMES) + 1, dtype=torch.float64)
    objective = PretrainingObjective(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), bs):
            batch = collate_generative(ds.read(mine[i:i + bs]), tokens, cfg.data.max_seq_len,
                                       ratios[(i // bs) % len(ratios)], seed=cfg.data.seed, epoch=0)
            with autocast():
                _, parts = objective(_to_device(batch, env.device), cell_emb_pass=True)
            sums[:-1] += torch.tensor([float(parts[n]) for n in LOSS_NAMES], dtype=torch.float64)
            sums[-1] += 1
    model.train(was_training)
    sums = env.sum(sums)
    return {n: float(sums[i] / sums[-1]) for i, n in enumerate(LOSS_NAMES)} if sums[-1] > 0 else {}


def _save_dir_atomic(target: Path, write) -> None:
    """Write a folder under a temporary name, then swap it in; a reader never sees half of one."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, device: str = "auto", resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Run (or resume) pretraining; returns a summary of the run."""
    workdir = Path(workdir)
    env = _Distributed(device)
    if env.main:
        check_workdir(workdir)
    data = open_training_data(cfg, "pass --data DIR")
    ds, tokens, train_cells, valid_cells = data.cells, data.tokens, data.train_cells, data.valid_cells
    vocab = ds.vocab
    accum = cfg.optim.grad_accum_steps
    micro_per_epoch = steps_per_epoch(len(train_cells), cfg.data.batch_size, env.world_size)
    if micro_per_epoch < accum:
        raise RiceFMInputError(f"{cfg.data.data_dir}: {len(train_cells)} training cells make fewer than "
                               f"{accum} batches of {cfg.data.batch_size} per rank; lower --config.data.batch_size")
    total_steps = cfg.train.max_steps or cfg.train.epochs * (micro_per_epoch // accum)

    torch.manual_seed(cfg.train.seed)
    attention = (devices.default_attention(env.device, cfg.model.dropout) if cfg.model.attention == "auto"
                 else cfg.model.attention)
    model = RiceFM.from_config(cfg.model, len(vocab), attention=attention)
    if cfg.train.init_checkpoint:
        init, _, init_vocab = load_torch_checkpoint(cfg.train.init_checkpoint)
        if init_vocab.sha256() != vocab.sha256():
            raise RiceFMInputError(f"{cfg.train.init_checkpoint}: its vocabulary differs from the dataset's "
                                   f"({cfg.data.data_dir}/vocab.json); rebuild the shards with --vocab from the checkpoint")
        strict_load(model, init.state_dict(), cfg.train.init_checkpoint)
    model.to(env.device)
    objective: torch.nn.Module = PretrainingObjective(model)
    if env.world_size > 1:
        ids = [env.device.index] if env.device.type != "cpu" else None
        objective = torch.nn.parallel.DistributedDataParallel(objective, device_ids=ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2),
                                 eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    if cfg.optim.schedule != "cosine":
        raise RiceFMInputError(f"--config.optim.schedule={cfg.optim.schedule!r}: only 'cosine' (with warmup) is supported")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, cfg.optim.warmup_fraction))
    amp_dtype, use_scaler = devices.amp_settings(cfg.train.precision, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=use_scaler)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=env.device.type, dtype=amp_dtype)

    step, epoch, micro, best = 0, 0, 0, math.inf
    latest = workdir / "checkpoints" / "latest"
    if resume:
        if not (latest / STATE_FILE).is_file():
            raise RiceFMInputError(f"--resume: no checkpoint at {latest}; start without --resume")
        saved, _, saved_vocab = load_torch_checkpoint(latest)
        if saved_vocab.sha256() != vocab.sha256():
            raise RiceFMInputError(f"--resume: {latest} was trained on another vocabulary than {cfg.data.data_dir}")
        state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=False)
        if state["config"] != config_fingerprint(cfg):
            raise RiceFMInputError(f"--resume: the config differs from the one {latest} was trained with; "
                                   "resume with the same --config and overrides")
        strict_load(model, saved.state_dict(), str(latest))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        devices.set_rng_state(env.device, state["rng"])
        step, epoch, micro, best = state["step"], state["epoch"], state["micro"], state["best_valid"]

    writer = None
    if env.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(workdir / "tensorboard"))
        write_json_atomic(workdir / "config.json", cfg.to_dict())
    log = TrainLog(workdir, writer, cfg.train.log_every)

    def save(valid: dict[str, float]) -> None:
        nonlocal best
        improved = bool(valid) and valid["total"] < best
        if improved:
            best = valid["total"]
        if env.main:
            def write_latest(d: Path) -> None:
                save_native(d, model, cfg.model, vocab, cfg.data)
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(), "rng": devices.rng_state(env.device), "step": step,
                            "epoch": epoch, "micro": micro, "best_valid": best, "config": config_fingerprint(cfg)},
                           d / STATE_FILE)

            _save_dir_atomic(latest, write_latest)
            if improved or not len(valid_cells):  # no validation cells: the latest weights are the best known
                _save_dir_atomic(workdir / "best", lambda d: save_published(d, model, cfg.model, vocab, cfg.data))
        env.barrier()

    stream = BatchStream(ds, tokens, cfg.data.batch_size, cfg.data.max_seq_len, cfg.data.gen_ratios, cfg.data.seed,
                         rank=env.rank, world_size=env.world_size, start_epoch=epoch, start_step=micro,
                         prefetch=cfg.data.prefetch, cells=train_cells, num_workers=cfg.data.num_workers)
    stop_at = min(total_steps, cfg.train.stop_at_step or total_steps)
    model.train()
    batches = iter(stream)
    bar = tqdm(total=total_steps, initial=step, unit="step", desc="ricefm_npu.train", disable=not (progress and env.main))
    try:
        while step < stop_at:
            sums = torch.zeros(len(LOSS_NAMES))
            for a in range(accum):
                raw = next(batches)
                batch = _to_device(raw, env.device)
                count = env.sum((~batch["gen_key_padding_mask"]).sum().reshape(1).double())
                denominator = (count / env.world_size).to(env.device, torch.float32)
                sync = contextlib.nullcontext() if (a == accum - 1 or env.world_size == 1) else objective.no_sync()
                with sync:
                    with autocast():
                        loss, parts = objective(batch, cell_emb_pass=step >= cfg.train.cell_emb_pass_after,
                                                denominator=denominator)
                    scaler.scale(loss / accum).backward()
                sums += torch.tensor([float(parts.get(n, 0.0)) for n in LOSS_NAMES]) / accum
                epoch, micro = next_position(raw, stream.steps_per_epoch)
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm))
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            losses = env.sum(sums.double()) / env.world_size
            record = log.step(step, losses.numpy(), lr, grad_norm,
                              accum * cfg.data.batch_size * env.world_size, last=step == stop_at)
            bar.set_postfix(loss=f"{record['loss_total']:.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            if step % cfg.train.checkpoint_every == 0 or step == stop_at:
                valid = _validate(model, ds, valid_cells, tokens, cfg, env, autocast) if len(valid_cells) else {}
                log.validation(step, valid)
                save(valid)
    finally:
        bar.close()
        log.close()
        batches.close()
    return {"steps": step, "total_steps": total_steps, "history": log.history, "best_valid": best,
            "world_size": env.world_size, "device": str(env.device), "attention": attention}


def _define_flags() -> dict[str, Any]:
    """Command-line flags, defined only when run as a program (importers keep their own flags)."""
    return {
        "config": config_flags.DEFINE_config_file("config", None, "ml-collections config file, e.g. configs/ricefm_base.py"),
        "data": flags.DEFINE_string("data", None, "dataset directory from `ricefm build-data` (sets config.data.data_dir)"),
        "workdir": flags.DEFINE_string("workdir", None, "output folder for checkpoints, logs, TensorBoard"),
        "device": flags.DEFINE_enum("device", "auto", list(devices.DEVICE_CHOICES), "auto prefers npu, then cuda, then cpu"),
        "resume": flags.DEFINE_bool("resume", False, "continue from WORKDIR/checkpoints/latest"),
    }


def main(argv, f: dict[str, Any]) -> None:
    del argv
    if f["config"].value is None or f["workdir"].value is None:
        raise app.UsageError("--config and --workdir are required")
    cfg = f["config"].value
    if f["data"].value:
        cfg.data.data_dir = f["data"].value
    try:
        summary = train(cfg, f["workdir"].value, f["device"].value, f["resume"].value)
    except RiceFMInputError as e:
        raise app.UsageError(str(e)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary["history"] and int(os.environ.get("RANK", "0")) == 0:
        last = summary["history"][-1]
        print(f"done: {summary['steps']}/{summary['total_steps']} steps on {summary['device']} x{summary['world_size']} "
              f"({summary['attention']} attention); last loss {last['loss_total']:.4f}; best valid {summary['best_valid']:.4f}")


if __name__ == "__main__":
    _flags = _define_flags()
    app.run(lambda argv: main(argv, _flags))
