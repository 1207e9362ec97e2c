"""Pretrain riceFM with JAX/Flax, data parallel over all devices (mirrors ``ricefm_npu/train.py``).

    python -m ricefm_jax.train --config configs/ricefm_base.py --data DIR --workdir OUT \
        [--device auto|cuda|tpu|cpu] [--resume] [--config.train.epochs=5 ...]

The loop, validation, logging, best tracking and resume checks are ``ricefm.training``'s, shared
with ``ricefm_npu.train``; this module supplies the JAX step. ``config.data.batch_size`` is per
device; the global batch is sharded over a 1-D ``jax.sharding`` Mesh (axis ``data``), parameters
replicated. Launched on several hosts (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` set), it calls ``jax.distributed.initialize`` and each process reads its own
cells. The step is one jit-compiled function (optax: clip, Adam, cosine schedule with warmup;
``optax.MultiSteps`` for accumulation); batches are padded to max_seq_len so it compiles once per
gen ratio. Orbax ``CheckpointManager`` keeps params, optimizer state and the run position in
``OUT/checkpoints``; dropout keys are a function of (seed, step), so ``--resume`` is exact.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from converters.formats import load_checkpoint
from ricefm import training
from ricefm.batching import pad_generative
from ricefm.integrity import check_sealed, seal
from ricefm.training import BATCH_INPUTS, LOSS_NAMES
from ricefm_jax import devices
from ricefm_jax.checkpoints import save_flax_model
from ricefm_jax.model import RiceFM
from ricefm_jax.objective import pretraining_loss
from ricefm_jax.params import load_state_dict



def lr_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 (``ricefm.training.cosine_with_warmup`` in optax)."""
    warmup = int(total_steps * cfg.optim.warmup_fraction)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.optim.lr, warmup, max(total_steps, warmup + 1), 0.0)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.optim.grad_clip_norm)]
    if cfg.optim.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.optim.weight_decay))  # L2 as torch Adam's weight_decay
    parts.append(optax.adam(lr_schedule(cfg, total_steps), b1=cfg.optim.b1, b2=cfg.optim.b2, eps=cfg.optim.eps))
    tx = optax.chain(*parts)
    if cfg.optim.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.optim.grad_accum_steps)
    return tx


def _applied_gradient(grads, opt_state):
    """The gradient the optimizer applies at this micro-step: the running mean that MultiSteps keeps
    (what torch accumulates), or the gradient itself without accumulation."""
    if isinstance(opt_state, optax.MultiStepsState):
        n = opt_state.mini_step
        return jax.tree.map(lambda g, acc: (g + n * acc) / (n + 1), grads, opt_state.acc_grads)
    return grads


def make_train_step(graphdef, tx: optax.GradientTransformation, base_key: jax.Array):
    """The compiled micro-step: (params, opt_state, rest, batch, micro_step) -> (params, opt_state, losses,
    norm of the gradient applied once the accumulation completes)."""

    @partial(jax.jit, static_argnames=("cell_emb_pass",), donate_argnums=(0, 1))
    def train_step(params, opt_state, rest, batch, step, cell_emb_pass=True):
        m = nnx.merge(graphdef, params, rest)
        m.train()
        nnx.reseed(m, dropout=jax.random.fold_in(base_key, step))  # dropout keys: f(seed, step)
        (_, parts), grads = nnx.value_and_grad(lambda mod: pretraining_loss(mod, batch, cell_emb_pass),
                                               has_aux=True)(m)
        norm = optax.tree.norm(_applied_gradient(grads, opt_state))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts, norm

    return train_step


class JaxSteps:
    """The JAX side of ``ricefm.training.Steps``."""

    def __init__(self, p: training.Plan, mesh_devices: list[jax.Device]):
        cfg = p.cfg
        self.plan, self.cfg = p, cfg
        self.attention = "math" if cfg.model.attention in ("auto", "sdpa", "npu_fusion") else cfg.model.attention
        self.dtype = devices.compute_dtype(cfg.train.precision, mesh_devices[0])
        model = RiceFM.from_config(cfg.model, len(p.vocab), attention=self.attention, dtype=self.dtype,
                                   seed=cfg.train.seed)
        if cfg.train.init_checkpoint:
            init = load_checkpoint(cfg.train.init_checkpoint)
            p.check_vocab(init.vocab, cfg.train.init_checkpoint)
            load_state_dict(model, init.state, cfg.train.init_checkpoint)
        else:
            load_state_dict(model, p.initial_state(), "ricefm.init")
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        mesh = Mesh(np.array(mesh_devices), ("data",))
        self.data_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        self.tx = make_optimizer(cfg, p.total_steps)  # MultiSteps advances the schedule once per optimizer step
        self.params, self.rest = jax.device_put(params, replicated), jax.device_put(self.rest, replicated)
        self.opt_state = jax.device_put(self.tx.init(self.params), replicated)
        self.train_step = make_train_step(self.graphdef, self.tx, jax.random.key(cfg.train.seed))
        self.local_device = next(d for d in mesh_devices if d.process_index == jax.process_index())
        self.eval_step = jax.jit(self._eval)
        self._eval_copy: tuple | None = None  # (params it was made from, local params, local rest)
        self.manager = ocp.CheckpointManager(p.workdir / "checkpoints",
                                             options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
        self.n_devices = len(mesh_devices)
        precision = "bf16" if self.dtype == jnp.bfloat16 else "fp32"
        self.description = (f"jax {jax.__version__} on {self.n_devices} {mesh_devices[0].platform} device(s) "
                            f"x{p.world_size}, {self.attention} attention, {precision}")
        self.precision = precision

    def _eval(self, params, rest, batch):
        m = nnx.merge(self.graphdef, params, rest)
        m.eval()
        return pretraining_loss(m, batch, True)[1]

    def _global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(batch[k]))
                for k in BATCH_INPUTS}

    def step(self, micro_batches: Sequence[dict[str, np.ndarray]], step: int, cell_emb_pass: bool
             ) -> tuple[np.ndarray, float]:
        accum, sums, norm = len(micro_batches), np.zeros(len(LOSS_NAMES)), None
        for i, raw in enumerate(micro_batches):
            self.params, self.opt_state, parts, norm = self.train_step(
                self.params, self.opt_state, self.rest, self._global(raw), step * accum + i, cell_emb_pass=cell_emb_pass)
            sums += np.array([float(parts.get(k, 0.0)) for k in LOSS_NAMES]) / accum
        return sums, float(norm)

    def eval_losses(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """On this process's first device, unsharded: validation batches need not divide the mesh."""
        padded = pad_generative(batch, self.cfg.data.max_seq_len, self.plan.data.tokens)  # one compile per ratio
        if self._eval_copy is None or self._eval_copy[0] is not self.params:  # one copy per validation, not per batch
            self._eval_copy = (self.params, self._local(self.params), self._local(self.rest))
        parts = self.eval_step(*self._eval_copy[1:], jax.device_put({k: padded[k] for k in BATCH_INPUTS},
                                                                  self.local_device))
        return np.array([float(parts[k]) for k in LOSS_NAMES])

    def _local(self, tree):
        """A copy of a replicated tree on this process's first device (its addressable shard)."""
        return jax.tree.map(lambda x: jax.device_put(x.addressable_shards[0].data, self.local_device)
                            if isinstance(x, jax.Array) else x, tree)

    def sum_across(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, np.float64)
        if jax.process_count() == 1:
            return values
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(values)).sum(0)

    def save(self, meta: dict[str, Any]) -> None:
        self.manager.save(meta["step"], args=ocp.args.Composite(
            params=ocp.args.StandardSave(self.params), opt_state=ocp.args.StandardSave(self.opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        if jax.process_index() == 0:  # digests of the finished step folder; restore checks them
            seal(self._step_dir(meta["step"]))

    def _step_dir(self, step: int) -> Path:
        return Path(self.manager.directory) / str(step)

    def restore(self) -> dict[str, Any] | None:
        latest = self.manager.latest_step()
        if latest is None:
            return None
        check_sealed(self._step_dir(latest), "training checkpoint")
        restored = self.manager.restore(latest, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(self.params), opt_state=ocp.args.StandardRestore(self.opt_state),
            meta=ocp.args.JsonRestore()))
        self.params, self.opt_state = restored["params"], restored["opt_state"]
        return restored["meta"]

    def export(self, folder: Path) -> None:
        export = RiceFM.from_config(self.cfg.model, len(self.plan.vocab), attention=self.attention)
        nnx.update(export, jax.device_get(self._local(self.params)))
        save_flax_model(folder, export, self.cfg.model, self.plan.vocab, fmt="seed", data=self.cfg.data)

    def summary(self) -> dict[str, Any]:
        return {"description": self.description, "devices": self.n_devices, "processes": jax.process_count(),
                "attention": self.attention, "precision": self.precision, "main": jax.process_index() == 0,
                "params": jax.device_get(self.params)}

    def close(self) -> None:
        self.manager.close()


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, device: str = "auto", resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Run (or resume) pretraining; returns a summary of the run."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    mesh_devices = devices.resolve_devices(device)
    local = sum(d.process_index == jax.process_index() for d in mesh_devices)
    p = training.plan(cfg, workdir, jax.process_index(), jax.process_count(), int(cfg.data.batch_size) * local)

    def make_writer(logdir: str):
        from tensorboardX import SummaryWriter

        return SummaryWriter(logdir)

    cache = str(cfg.train.get("compilation_cache", "auto"))
    try:
        with devices.compilation_cache(p.workdir / "xla_cache" if cache == "auto" else cache or None):
            steps = JaxSteps(p, mesh_devices)
            try:
                return training.run(p, steps, resume, make_writer, pad_to_max=True, progress=progress,
                                    name="ricefm_jax.train")
            finally:
                steps.close()
    finally:
        p.release()


if __name__ == "__main__":
    training.launch(train)
