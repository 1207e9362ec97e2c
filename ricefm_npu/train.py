"""Pretrain riceFM with torch on Ascend NPU, CUDA or CPU; data parallel under torchrun.

    python -m ricefm_npu.train --config configs/ricefm_base.py --data DIR --workdir OUT \
        [--device auto|npu|cuda|cpu] [--resume] [--config.train.epochs=5 ...]
    torchrun --nproc_per_node 8 -m ricefm_npu.train ...      # hccl on NPU, nccl on CUDA, gloo on CPU

The loop, validation, logging, best tracking and resume checks are ``ricefm.training``'s, shared
with ``ricefm_jax.train``; this module supplies the torch step (DDP, autocast, grad scaler,
accumulation), evaluation, and the checkpoint: ``OUT/checkpoints/latest`` (model.safetensors +
config.json + vocab.json + training_state.pt: optimizer, scheduler, grad scaler, RNG states, data
position), swapped in atomically. ``OUT/best`` holds the published format.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np
import torch
import torch.distributed as dist

from ricefm import training
from ricefm.atomic import recover_dir, staged_dir
from ricefm.integrity import seal
from ricefm.training import BATCH_INPUTS, LOSS_NAMES
from ricefm_npu import compat, devices
from ricefm_npu.checkpoints import load_torch_checkpoint, save_native, save_published, strict_load
from ricefm_npu.model import RiceFM
from ricefm_npu.objective import PretrainingObjective

STATE_FILE = "training_state.pt"


def _to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(batch[k])).to(device, non_blocking=True) for k in BATCH_INPUTS}


class _Distributed:
    """Rank/world/device for this process; torchrun's environment turns DDP on."""

    def __init__(self, device_name: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = devices.resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend=devices.ddp_backend(self.device))
        self.rank = dist.get_rank() if self.world_size > 1 else 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class TorchSteps:
    """The torch side of ``ricefm.training.Steps``."""

    def __init__(self, p: training.Plan, env: _Distributed):
        cfg = p.cfg
        self.plan, self.env, self.cfg = p, env, cfg
        torch.manual_seed(cfg.train.seed)  # dropout draws
        self.attention = (devices.default_attention(env.device, cfg.model.dropout) if cfg.model.attention == "auto"
                          else cfg.model.attention)
        self.model = RiceFM.from_config(cfg.model, len(p.vocab), attention=self.attention)
        if cfg.train.init_checkpoint:
            init, _, init_vocab = load_torch_checkpoint(cfg.train.init_checkpoint)
            p.check_vocab(init_vocab, cfg.train.init_checkpoint)
            strict_load(self.model, init.state_dict(), cfg.train.init_checkpoint)
        else:
            strict_load(self.model, {k: torch.from_numpy(v) for k, v in p.initial_state().items()}, "ricefm.init")
        self.model.to(env.device)
        self.objective: torch.nn.Module = PretrainingObjective(self.model)
        if env.world_size > 1:
            ids = [env.device.index] if env.device.type != "cpu" else None
            self.objective = torch.nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2),
                                          eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, training.cosine_with_warmup(p.total_steps, cfg.optim.warmup_fraction))
        self.amp_dtype, use_scaler = devices.amp_settings(cfg.train.precision, env.device)
        self.precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        self.scaler = compat.grad_scaler(env.device, use_scaler)
        self.latest = p.workdir / "checkpoints" / "latest"
        self.description = (f"torch {torch.__version__} on {env.device} x{env.world_size}, {self.attention} attention, "
                            f"{self.precision}")
        self.model.train()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=self.amp_dtype)

    def step(self, micro_batches: Sequence[dict[str, np.ndarray]], step: int, cell_emb_pass: bool
             ) -> tuple[np.ndarray, float]:
        env, accum = self.env, len(micro_batches)
        sums = torch.zeros(len(LOSS_NAMES), dtype=torch.float64)
        for a, raw in enumerate(micro_batches):
            batch = _to_device(raw, env.device)
            count = env.sum((~batch["gen_key_padding_mask"]).sum().reshape(1).double())
            denominator = (count / env.world_size).to(env.device, torch.float32)
            last = a == accum - 1
            sync = contextlib.nullcontext() if (last or env.world_size == 1) else self.objective.no_sync()
            with sync:
                with self._autocast():
                    loss, parts = self.objective(batch, cell_emb_pass=cell_emb_pass, denominator=denominator)
                self.scaler.scale(loss / accum).backward()
            sums += torch.tensor([float(parts.get(n, 0.0)) for n in LOSS_NAMES], dtype=torch.float64) / accum
        self.scaler.unscale_(self.optimizer)  # the accumulated mean gradient, unscaled: the one applied
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return (env.sum(sums) / env.world_size).numpy(), grad_norm

    @torch.no_grad()
    def eval_losses(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        self.model.eval()
        try:
            with self._autocast():
                _, parts = PretrainingObjective(self.model)(_to_device(batch, self.env.device), cell_emb_pass=True)
        finally:
            self.model.train()
        return np.array([float(parts[n]) for n in LOSS_NAMES])

    def sum_across(self, values: np.ndarray) -> np.ndarray:
        return self.env.sum(torch.from_numpy(np.asarray(values, np.float64))).numpy()

    def save(self, meta: dict[str, Any]) -> None:
        if self.env.rank == 0:
            with staged_dir(self.latest) as folder:
                save_native(folder, self.model, self.cfg.model, self.plan.vocab, self.cfg.data)
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "scaler": self.scaler.state_dict(), "rng": devices.rng_state(self.env.device),
                            "meta": meta}, folder / STATE_FILE)
                seal(folder)  # now covering the training state too; restore checks it
        self.env.barrier()

    def restore(self) -> dict[str, Any] | None:
        if self.env.rank == 0:
            recover_dir(self.latest)  # a run killed inside the checkpoint swap
        self.env.barrier()
        if not (self.latest / STATE_FILE).is_file():
            return None
        saved, _, saved_vocab = load_torch_checkpoint(self.latest)
        self.plan.check_vocab(saved_vocab, str(self.latest))
        state = torch.load(self.latest / STATE_FILE, map_location="cpu", weights_only=False)
        strict_load(self.model, saved.state_dict(), str(self.latest))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        devices.set_rng_state(self.env.device, state["rng"])
        return state["meta"]

    def export(self, folder: Path) -> None:
        save_published(folder, self.model, self.cfg.model, self.plan.vocab, self.cfg.data)

    def summary(self) -> dict[str, Any]:
        return {"description": self.description, "device": str(self.env.device), "attention": self.attention,
                "precision": self.precision, "main": self.env.rank == 0}


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, device: str = "auto", resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Run (or resume) pretraining; returns a summary of the run."""
    compat.check_runtime()
    env = _Distributed(device)
    try:
        p = training.plan(cfg, workdir, env.rank, env.world_size, int(cfg.data.batch_size))

        def make_writer(logdir: str):
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(logdir)

        try:
            return training.run(p, TorchSteps(p, env), resume, make_writer, progress=progress, name="ricefm_npu.train")
        finally:
            p.release()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    training.launch(train)
