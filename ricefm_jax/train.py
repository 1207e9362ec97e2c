"""Pretrain riceFM with JAX/Flax, data parallel over all devices (mirrors ``ricefm_npu/train.py``).

    python -m ricefm_jax.train --config configs/ricefm_base.py --config.data.data_dir=DIR --workdir OUT [--resume]

``config.data.batch_size`` is per device; the global batch is sharded over a 1-D ``jax.sharding``
Mesh (axis ``data``) and parameters are replicated. Launched on several hosts (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` set), it calls ``jax.distributed.initialize`` and each
process reads its own cells. The step is one jit-compiled function (optax: clip, Adam, cosine
schedule with warmup, optional accumulation via ``optax.MultiSteps``). Batches are padded to
max_seq_len so the step compiles once per gen ratio. Orbax ``CheckpointManager`` keeps params,
optimizer state, step and data position (``OUT/checkpoints``); the best weights by validation
loss are exported in the published format to ``OUT/best``. Dropout keys are a function of
(seed, step), so ``--resume`` continues exactly. TensorBoard scalars (same names as the torch
path) go to ``OUT/tensorboard``, every logged step to ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_flags
from tqdm.auto import tqdm

from converters.formats import load_checkpoint
from ricefm.atomic import write_json_atomic
from ricefm.batching import BatchStream, collate_generative, pad_generative, steps_per_epoch
from ricefm.errors import RiceFMInputError
from ricefm.training import (LOSS_NAMES, TrainLog, check_workdir, config_fingerprint, next_position,
                             open_training_data)
from ricefm_jax.checkpoints import save_flax_model
from ricefm_jax.model import RiceFM
from ricefm_jax.objective import pretraining_loss
from ricefm_jax.params import load_state_dict

BATCH_KEYS = ("pcpt_gene_ids", "pcpt_values", "pcpt_key_padding_mask", "gen_gene_ids", "gen_target_values",
              "gen_key_padding_mask", "mod_types")


def compute_dtype(precision: str):
    """auto: bf16 on GPU/TPU, fp32 on CPU (XLA's CPU bf16 is slow). Parameters stay fp32."""
    if precision == "auto":
        precision = "fp32" if jax.default_backend() == "cpu" else "bf16"
    table = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
    if precision not in table:
        raise RiceFMInputError(f"--config.train.precision={precision!r}: the JAX path supports auto, fp32, bf16")
    return table[precision]


def lr_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 (the published schedule, as the torch path's)."""
    warmup = int(total_steps * cfg.optim.warmup_fraction)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.optim.lr, warmup, max(total_steps, warmup + 1), 0.0)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    if cfg.optim.schedule != "cosine":
        raise RiceFMInputError(f"--config.optim.schedule={cfg.optim.schedule!r}: only 'cosine' (with warmup) is supported")
    schedule = lr_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.optim.grad_clip_norm)]
    if cfg.optim.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.optim.weight_decay))  # L2 as torch Adam's weight_decay
    parts.append(optax.adam(schedule, b1=cfg.optim.b1, b2=cfg.optim.b2, eps=cfg.optim.eps))
    tx = optax.chain(*parts)
    if cfg.optim.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.optim.grad_accum_steps)
    return tx


def make_train_step(graphdef, tx: optax.GradientTransformation, base_key: jax.Array):
    """The compiled step: (params, opt_state, rest, batch, step) -> (params, opt_state, losses, grad norm)."""

    @partial(jax.jit, static_argnames=("cell_emb_pass",), donate_argnums=(0, 1))
    def train_step(params, opt_state, rest, batch, step, cell_emb_pass=True):
        m = nnx.merge(graphdef, params, rest)
        m.train()
        nnx.reseed(m, dropout=jax.random.fold_in(base_key, step))  # dropout keys: f(seed, step)
        (_, parts), grads = nnx.value_and_grad(lambda mod: pretraining_loss(mod, batch, cell_emb_pass),
                                               has_aux=True)(m)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts, optax.tree.norm(grads)

    return train_step


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, resume: bool = False, progress: bool = True
          ) -> dict[str, Any]:
    """Run (or resume) pretraining; returns a summary of the run."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    workdir = Path(workdir).resolve()
    main_process = jax.process_index() == 0
    if main_process:
        check_workdir(workdir)
    data = open_training_data(cfg, "set --config.data.data_dir=DIR")
    ds, tokens, train_cells, valid_cells = data.cells, data.tokens, data.train_cells, data.valid_cells
    vocab = ds.vocab

    mesh = Mesh(np.array(jax.devices()), ("data",))
    data_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    per_process = cfg.data.batch_size * jax.local_device_count()
    rank, world = jax.process_index(), jax.process_count()
    accum = cfg.optim.grad_accum_steps
    micro_per_epoch = steps_per_epoch(len(train_cells), per_process, world)
    if micro_per_epoch < accum:
        raise RiceFMInputError(f"{cfg.data.data_dir}: {len(train_cells)} training cells make fewer than {accum} "
                               f"batches of {per_process} per process; lower --config.data.batch_size")
    total_steps = cfg.train.max_steps or cfg.train.epochs * (micro_per_epoch // accum)

    attention = "math" if cfg.model.attention in ("auto", "sdpa", "npu_fusion") else cfg.model.attention
    model = RiceFM.from_config(cfg.model, len(vocab), attention=attention, dtype=compute_dtype(cfg.train.precision),
                               seed=cfg.train.seed)
    if cfg.train.init_checkpoint:
        init = load_checkpoint(cfg.train.init_checkpoint)
        if init.vocab.sha256() != vocab.sha256():
            raise RiceFMInputError(f"{cfg.train.init_checkpoint}: its vocabulary differs from the dataset's "
                                   f"({cfg.data.data_dir}/vocab.json); rebuild the shards with --vocab from the checkpoint")
        load_state_dict(model, init.state, cfg.train.init_checkpoint)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg, total_steps)  # MultiSteps advances the schedule once per optimizer step
    params, rest = jax.device_put(params, replicated), jax.device_put(rest, replicated)
    opt_state = jax.device_put(tx.init(params), replicated)
    base_key = jax.random.key(cfg.train.seed)

    train_step = make_train_step(graphdef, tx, base_key)

    @jax.jit
    def eval_step(params, rest, batch):
        m = nnx.merge(graphdef, params, rest)
        m.eval()
        return pretraining_loss(m, batch, True)[1]

    def to_global(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(batch[k])) for k in BATCH_KEYS}

    manager = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    step, epoch, micro, best = 0, 0, 0, math.inf
    if resume:
        latest = manager.latest_step()
        if latest is None:
            raise RiceFMInputError(f"--resume: no checkpoint in {workdir / 'checkpoints'}; start without --resume")
        restored = manager.restore(latest, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params), opt_state=ocp.args.StandardRestore(opt_state),
            meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        if meta["config"] != config_fingerprint(cfg):
            raise RiceFMInputError(f"--resume: the config differs from the one {workdir} was trained with; "
                                   "resume with the same --config and overrides")
        if meta["vocab_sha256"] != vocab.sha256():
            raise RiceFMInputError(f"--resume: {workdir} was trained on another vocabulary than {cfg.data.data_dir}")
        params, opt_state = restored["params"], restored["opt_state"]
        step, epoch, micro, best = meta["step"], meta["epoch"], meta["micro"], meta["best_valid"]

    writer = None
    if main_process:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tensorboard"))
        write_json_atomic(workdir / "config.json", cfg.to_dict())
    log = TrainLog(workdir, writer, cfg.train.log_every)
    schedule = lr_schedule(cfg, total_steps)

    def validate() -> dict[str, float]:
        mine = valid_cells[rank::world]
        bs, ratios = per_process, tuple(cfg.data.gen_ratios)
        sums, n = np.zeros(len(LOSS_NAMES)), 0
        for i in range(0, len(mine) - bs + 1, bs):  # whole batches: every process runs the same count
            batch = collate_generative(ds.read(mine[i:i + bs]), tokens, cfg.data.max_seq_len,
                                       ratios[(i // bs) % len(ratios)], seed=cfg.data.seed, epoch=0)
            parts = eval_step(params, rest, to_global(pad_generative(batch, cfg.data.max_seq_len, tokens)))
            sums += np.array([float(parts[k]) for k in LOSS_NAMES])
            n += 1
        return {k: float(sums[i] / n) for i, k in enumerate(LOSS_NAMES)} if n else {}

    def save(valid: dict[str, float]) -> None:
        nonlocal best
        improved = bool(valid) and valid["total"] < best
        if improved:
            best = valid["total"]
        meta = {"step": step, "epoch": epoch, "micro": micro, "best_valid": best, "vocab_sha256": vocab.sha256(),
                "config": config_fingerprint(cfg)}
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                   opt_state=ocp.args.StandardSave(opt_state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()
        if main_process and (improved or not len(valid_cells)):
            export = RiceFM.from_config(cfg.model, len(vocab), attention=attention)
            nnx.update(export, jax.device_get(params))
            target = workdir / "best"
            staged = workdir / ".best.new"
            import shutil

            shutil.rmtree(staged, ignore_errors=True)
            save_flax_model(staged, export, cfg.model, vocab, fmt="seed")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staged, target)

    stream = BatchStream(ds, tokens, per_process, cfg.data.max_seq_len, cfg.data.gen_ratios, cfg.data.seed,
                         rank=rank, world_size=world, start_epoch=epoch, start_step=micro, prefetch=cfg.data.prefetch,
                         cells=train_cells, num_workers=cfg.data.num_workers, pad_to_max=True)
    stop_at = min(total_steps, cfg.train.stop_at_step or total_steps)
    batches = iter(stream)
    bar = tqdm(total=total_steps, initial=step, unit="step", desc="ricefm_jax.train", disable=not (progress and main_process))
    try:
        while step < stop_at:
            sums, norm = np.zeros(len(LOSS_NAMES)), 0.0
            for _ in range(accum):
                raw = next(batches)
                params, opt_state, parts, gnorm = train_step(params, opt_state, rest, to_global(raw), step * accum + _,
                                                             cell_emb_pass=step >= cfg.train.cell_emb_pass_after)
                sums += np.array([float(parts.get(k, 0.0)) for k in LOSS_NAMES]) / accum
                norm = float(gnorm)
                epoch, micro = next_position(raw, stream.steps_per_epoch)
            lr = float(schedule(step))
            step += 1
            record = log.step(step, sums, lr, norm, accum * per_process * world, last=step == stop_at)
            bar.set_postfix(loss=f"{record['loss_total']:.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            if step % cfg.train.checkpoint_every == 0 or step == stop_at:
                valid = validate() if len(valid_cells) else {}
                log.validation(step, valid)
                save(valid)
    finally:
        bar.close()
        batches.close()
        manager.close()
        log.close()
    return {"steps": step, "total_steps": total_steps, "history": log.history, "best_valid": best,
            "devices": jax.device_count(), "processes": world, "attention": attention,
            "params": jax.device_get(params)}


def _define_flags() -> dict[str, Any]:
    return {
        "config": config_flags.DEFINE_config_file("config", None, "ml-collections config file, e.g. configs/ricefm_base.py"),
        "workdir": flags.DEFINE_string("workdir", None, "output folder for checkpoints, logs, TensorBoard"),
        "resume": flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in WORKDIR/checkpoints"),
    }


def main(argv, f: dict[str, Any]) -> None:
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    if f["config"].value is None or f["workdir"].value is None:
        raise app.UsageError("--config and --workdir are required")
    try:
        summary = train(f["config"].value, f["workdir"].value, f["resume"].value)
    except RiceFMInputError as e:
        raise app.UsageError(str(e)) from None
    if summary["history"] and jax.process_index() == 0:
        last = summary["history"][-1]
        print(f"done: {summary['steps']}/{summary['total_steps']} steps on {summary['devices']} device(s) "
              f"x{summary['processes']} process(es) ({summary['attention']} attention); last loss "
              f"{last['loss_total']:.4f}; best valid {summary['best_valid']:.4f}")


if __name__ == "__main__":
    _flags = _define_flags()
    app.run(lambda argv: main(argv, _flags))
