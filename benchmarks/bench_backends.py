"""JAX vs torch training step at the same config, batch and data, measured in one run.

    python benchmarks/bench_backends.py [--batch 8] [--seq 1200] [--steps 3] [--output benchmarks/results/backends.json]

Both backends train the base-config model on the same padded generative batch (cells that fill
max_seq_len), fp32: torch with its exact ``math`` attention, JAX with ``math`` (dropout 0.2, the
training config) and ``dot_product`` (``jax.nn.dot_product_attention``, which has no dropout, so
compared with ``math`` at dropout 0). Reported as step time, cells/s and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_batch(batch: int, seq: int):
    from ricefm.batching import TokenSpec, collate_generative, pad_generative
    from ricefm.shards.reader import CellBatch
    from ricefm.vocab import GeneVocab

    vocab = GeneVocab.default()
    rng = np.random.default_rng(0)
    n = 1500
    cells = CellBatch(np.arange(batch), np.full(batch, n, np.int64), np.zeros(batch, np.int8),
                      {"gene_ids": rng.integers(0, vocab.n_genes, batch * n).astype(np.int32),
                       "bins": rng.integers(1, 51, batch * n).astype(np.uint8)})
    tokens = TokenSpec(vocab.pad_id, vocab.cls_id)
    return pad_generative(collate_generative(cells, tokens, seq, 0.5, 0, 0), seq, tokens), len(vocab)


def time_steps(step, n: int) -> list[float]:
    step()  # warm-up / compile
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def torch_step(batch, vocab_size, dropout):
    import torch

    from ricefm_configs import ricefm_base
    from ricefm_npu.model import RiceFM
    from ricefm_npu.objective import PretrainingObjective

    cfg = ricefm_base.get_config().model
    cfg.dropout = dropout
    torch.manual_seed(0)
    model = RiceFM.from_config(cfg, vocab_size, attention="math").train()
    obj = PretrainingObjective(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if k not in ("gen_prob", "cell_index")}

    def step():
        loss, _ = obj(data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def jax_step(batch, vocab_size, dropout, attention):
    import jax
    import optax
    from flax import nnx

    from ricefm_configs import ricefm_base
    from ricefm_jax.model import RiceFM
    from ricefm_jax.train import BATCH_INPUTS, make_train_step

    cfg = ricefm_base.get_config().model
    cfg.dropout = dropout
    model = RiceFM.from_config(cfg, vocab_size, attention=attention)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-4))
    fn = make_train_step(graphdef, tx, jax.random.key(0))
    data = {k: jax.numpy.asarray(batch[k]) for k in BATCH_INPUTS}
    state = {"params": params, "opt": tx.init(params), "i": 0}

    def step():
        state["params"], state["opt"], parts, _ = fn(state["params"], state["opt"], rest, data, state["i"])
        jax.block_until_ready(parts["total"])
        state["i"] += 1
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1200)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--output", default=str(REPO / "benchmarks/results/backends.json"))
    args = p.parse_args()
    batch, vocab_size = make_batch(args.batch, args.seq)
    tokens = int((~batch["pcpt_key_padding_mask"]).sum() + (~batch["gen_key_padding_mask"]).sum())
    runs = {}
    for name, make in (("torch_math_dropout0.2", lambda: torch_step(batch, vocab_size, 0.2)),
                       ("jax_math_dropout0.2", lambda: jax_step(batch, vocab_size, 0.2, "math")),
                       ("torch_math_dropout0", lambda: torch_step(batch, vocab_size, 0.0)),
                       ("jax_math_dropout0", lambda: jax_step(batch, vocab_size, 0.0, "math")),
                       ("jax_dot_product_dropout0", lambda: jax_step(batch, vocab_size, 0.0, "dot_product"))):
        times = time_steps(make(), args.steps)
        sec = float(np.median(times))
        runs[name] = {"step_seconds": sec, "all": times, "cells_per_s": args.batch / sec, "tokens_per_s": tokens / sec}
        print(f"{name:26s} {sec:7.2f} s/step  {args.batch / sec:6.2f} cells/s", flush=True)
    import jax
    import torch

    result = {"benchmark": "backends_train_step", "config": "ricefm_base", "batch": args.batch, "max_seq_len": args.seq,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                          "jax_backend": jax.default_backend(), "torch": torch.__version__}, "runs": runs,
              "ratios": {"jax_over_torch_cells_per_s_dropout0.2": runs["torch_math_dropout0.2"]["step_seconds"]
                         / runs["jax_math_dropout0.2"]["step_seconds"],
                         "jax_over_torch_cells_per_s_dropout0": runs["torch_math_dropout0"]["step_seconds"]
                         / runs["jax_math_dropout0"]["step_seconds"],
                         "dot_product_over_math_jax": runs["jax_math_dropout0"]["step_seconds"]
                         / runs["jax_dot_product_dropout0"]["step_seconds"]},
              "goal": {"jax_over_torch": 1.0}}
    from ricefm.atomic import write_json_atomic

    write_json_atomic(args.output, result)
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
