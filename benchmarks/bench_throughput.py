"""Throughput on real cells: real (non-padding) tokens/s, padding and MFU per workload, in one run.

    python benchmarks/bench_throughput.py [--batches 4] [--output benchmarks/results/throughput.json]

Base-config model (d 256, 4 heads, 6 layers), fp32, on this machine. Workloads:
- pretrain torch / pretrain jax: the trainers' own batches (``BatchStream``: max_seq_len 1,200,
  gen ratios 0.25/0.5/0.75, batch 8 cells), forward + backward of both passes + clip + Adam;
- finetune torch / jax: the annotation fine-tuning batches (``AnnotationRun``, at batch 8 here, up to 1,200
  tokens, ``length_multiple`` 32), forward + backward + Adam, dropout 0.2;
- embed torch / jax: ``ricefm embed``'s batches (<cls> + up to 3,000 genes), batch 8, forward only.
Corpora: the shipped 2,000 rice root cells (median 512 non-zero genes, p90 968, max 1,556) and a
synthetic plant-like corpus of 2,000 cells whose gene counts are log-normal with median 1,500,
sigma 0.5, clipped to [200, 3,000] (deep plant scRNA-seq / spatial profiles).
Every variant's process keeps its freed host memory as the trainers do (``train.host_memory=keep``,
``ricefm/host_memory.py``); shipped pretraining also runs with glibc's default (``.../release``).
Variants: ``published`` batching with the frameworks' own dropout masks (the behaviour before this
work: torch pads to the longest cell, the JAX trainer pads every batch to max_seq_len) against
``bucketed`` with ``fast`` masks, that at dropout 0 too, and (shipped pretraining) each change
alone (``published`` + ``fast``, ``bucketed`` + ``framework``); ``--batches`` batches evenly spaced over
epoch 0 are timed after every shape was run once (JAX compiles one program per shape; the count
and lengths an epoch needs are reported, and the seconds a new shape costs). The variants of a
workload are timed interleaved (batch i of each, in an order that rotates, then batch i + 1), so a
slow spell of the machine falls on all of them alike; each variant runs in a process of its own
(as a trainer runs one model), one at a time, and each batch runs twice in a row with the
faster run counting, so no variant pays for the state another one left. Padding is
counted over the whole epoch; the program count and padding of other ``data.length_step`` values
are reported beside it.

Model FLOPs count real tokens only (padding is waste): per layer and stream of n tokens attending
to m keys, 2n(3d^2 + d^2 [pcpt only: out_proj] + 2 d d_hid) + 4 n m d (QK^T and PV); pcpt: m = n_p;
gen: m = n_p + 1 (its own token). Plus the value encoder 2 n_p (d + d^2), the expression decoder
2 n (2 d^2 + d) on every token of both streams, and MVC 4 n d^2 + 2 n d (first pass). Training =
3 x forward (backward = 2 x forward); pretraining has two passes (the second without MVC).
MFU vs this machine's GEMM = model FLOP/s / the best fp32 (and bf16) matmul rate measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEQ, PRETRAIN_BATCH, FINETUNE_BATCH, EMBED_BATCH, EMBED_SEQ = 1200, 8, 8, 8, 3001
REPEATS = 2  # runs of each timed batch in a row; the fastest counts (see measure_together)
LENGTH_STEPS = (32, 64, 128, 256)  # data.length_step values whose program count and padding are reported
SYNTHETIC = {"cells": 2000, "median_genes": 1500, "sigma": 0.5, "min_genes": 200, "max_genes": 3000, "genes": 8000}


# ---------------------------------------------------------------- data
def synthetic_h5ad(path: Path, vocab) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    s, rng = SYNTHETIC, np.random.default_rng(0)
    n = np.clip(np.round(s["median_genes"] * np.exp(s["sigma"] * rng.standard_normal(s["cells"]))),
                s["min_genes"], s["max_genes"]).astype(np.int64)
    names = [g for g in vocab.as_dict() if not g.startswith("<")]
    genes = [names[i] for i in rng.choice(len(names), s["genes"], replace=False)]
    cols = np.concatenate([np.sort(rng.choice(s["genes"], k, replace=False)) for k in n])
    X = sp.csr_matrix((rng.geometric(0.4, int(n.sum())).astype(np.float32), cols, np.r_[0, np.cumsum(n)]),
                      shape=(s["cells"], s["genes"]))
    obs = pd.DataFrame({"celltype": rng.choice([f"type{i}" for i in range(8)], s["cells"])},
                       index=[f"c{i}" for i in range(s["cells"])])
    ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)


def corpus(name: str, h5ad: Path, work: Path, vocab, annotation_cfg):
    """(shards directory, tokenized cells with labels) of one corpus."""
    from ricefm.finetune import read_reference
    from ricefm.shards.build import build_dataset

    shards = work / f"{name}_shards"
    build_dataset([h5ad], shards, progress=False)
    ref = read_reference(h5ad, "celltype", vocab, annotation_cfg, progress=False)
    return shards, ref


# ---------------------------------------------------------------- FLOPs
def forward_flops(n_p: np.ndarray, n_g: np.ndarray, d: int, d_hid: int, layers: int, mvc: bool) -> np.ndarray:
    """Model FLOPs of one forward pass per cell with n_p pcpt and n_g gen real tokens."""
    n_p, n_g = n_p.astype(np.float64), n_g.astype(np.float64)
    pcpt = 2 * n_p * (4 * d * d + 2 * d * d_hid) + 4 * n_p * n_p * d
    gen = 2 * n_g * (3 * d * d + 2 * d * d_hid) + 4 * n_g * (n_p + 1) * d
    heads = 2 * n_p * (d + d * d) + 2 * (n_p + n_g) * (2 * d * d + d)
    if mvc:
        heads += (n_p + n_g) * (4 * d * d + 2 * d)
    return layers * (pcpt + gen) + heads


def pretrain_flops(batch, m) -> float:
    n_p = (~batch["pcpt_key_padding_mask"]).sum(1)
    n_g = (~batch["gen_key_padding_mask"]).sum(1)
    both = forward_flops(n_p, n_g, m.d_model, m.d_hid, m.n_layers, True) + \
        forward_flops(n_p, n_g, m.d_model, m.d_hid, m.n_layers, False)
    return float(3 * both.sum())


def pcpt_flops(batch, m, train: bool) -> float:
    n_p = (~batch["key_padding_mask"]).sum(1)
    f = forward_flops(n_p, np.zeros_like(n_p), m.d_model, m.d_hid, m.n_layers, False)
    if train:  # + the classification head (3 layers on the cell embedding; negligible) and backward
        f = 3 * (f + 2 * 3 * m.d_model * m.d_model)
    return float(f.sum())


def token_counts(batch) -> tuple[int, int]:
    masks = [v for k, v in batch.items() if k.endswith("key_padding_mask")]
    return sum(int((~m).sum()) for m in masks), sum(int(m.size) for m in masks)


# ---------------------------------------------------------------- machine
def gemm_rates(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best matmul FLOP/s of torch and JAX at fp32 and bf16 (n x n x n)."""
    import jax
    import jax.numpy as jnp
    import torch

    out = {}
    for dtype in ("float32", "bfloat16"):
        a = torch.randn(n, n).to(getattr(torch, dtype))
        torch.matmul(a, a)
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, a)
        out[f"torch_{dtype}"] = 2 * n ** 3 * reps / (time.perf_counter() - t)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), getattr(jnp, dtype))
        f = jax.jit(jnp.matmul)
        f(x, x).block_until_ready()
        t = time.perf_counter()
        for _ in range(reps):
            f(x, x).block_until_ready()
        out[f"jax_{dtype}"] = 2 * n ** 3 * reps / (time.perf_counter() - t)
    return out


def mask_costs(shape=(8, 4, 600, 601), reps: int = 5) -> dict[str, float]:
    """Seconds to drop out one attention-probability tensor: framework masks vs fast ones (which leave
    the 1/(1-p) factor to the much smaller attention output, as the models do)."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from ricefm_jax.dropout import apply_dropout as jax_dropout
    from ricefm_npu.dropout import apply_dropout as torch_dropout

    def timed(f) -> float:
        f()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t) / reps

    x = torch.rand(shape)
    y = jnp.asarray(x.numpy())
    key = jax.random.key(0)
    framework = jax.jit(lambda v: jnp.where(jax.random.bernoulli(key, 0.8, v.shape), v / 0.8, 0))
    fast = jax.jit(lambda v: jax_dropout(v, 0.2, key, scale=False))
    softmax = jax.jit(lambda v: jax.nn.softmax(v, -1))
    return {"shape": list(shape),
            "torch_softmax": timed(lambda: torch.softmax(x, -1)),
            "torch_framework": timed(lambda: F.dropout(x, 0.2)),
            "torch_fast": timed(lambda: torch_dropout(x, 0.2, True, scale=False)),
            "jax_softmax": timed(lambda: softmax(y).block_until_ready()),
            "jax_framework": timed(lambda: framework(y).block_until_ready()),
            "jax_fast": timed(lambda: fast(y).block_until_ready())}


# ---------------------------------------------------------------- steps
def model_config(dropout: float, masks: str):
    from ricefm_configs import ricefm_base

    m = ricefm_base.get_config().model
    m.dropout, m.dropout_masks = dropout, masks
    return m


def torch_pretrain_step(vocab_size: int, dropout: float, masks: str) -> Callable:
    import torch

    from ricefm_npu.model import RiceFM
    from ricefm_npu.objective import PretrainingObjective

    torch.manual_seed(0)
    obj = PretrainingObjective(RiceFM.from_config(model_config(dropout, masks), vocab_size, attention="math").train())
    opt = torch.optim.Adam(obj.parameters(), lr=1e-4)

    def step(batch):
        loss, _ = obj({k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()
                       if k not in ("gen_prob", "cell_index", "epoch", "step")})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(obj.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def jax_pretrain_step(vocab_size: int, dropout: float, masks: str) -> Callable:
    import jax
    import optax
    from flax import nnx

    from ricefm_jax.model import RiceFM
    from ricefm_jax.train import BATCH_INPUTS, make_train_step

    graphdef, params, rest = nnx.split(RiceFM.from_config(model_config(dropout, masks), vocab_size), nnx.Param, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-4))
    fn = make_train_step(graphdef, tx, jax.random.key(0))
    state = {"params": params, "opt": tx.init(params), "i": 0}

    def step(batch):
        data = {k: jax.numpy.asarray(batch[k]) for k in BATCH_INPUTS}
        state["params"], state["opt"], parts, _ = fn(state["params"], state["opt"], rest, data, state["i"])
        jax.block_until_ready(parts["total"])
        state["i"] += 1
    return step


def finetune_step(backend: str, checkpoint: Path, n_classes: int, masks: str) -> Callable:
    from ricefm.evaluate.annotation import annotation_config, init_head, load_finetuner

    cfg = annotation_config()
    ft = load_finetuner(backend, checkpoint, device="cpu")
    ft.model_config.dropout_masks = masks
    ft.start(init_head(int(ft.model_config.d_model), n_classes, 3, 0), n_classes, cfg, 100, 0)
    weights = np.ones(n_classes, np.float32)
    return lambda batch: ft.train_step(batch, batch["labels"], weights)


def embed_step(backend: str, checkpoint: Path) -> Callable:
    from ricefm.embed import load_embedder

    embedder = load_embedder(backend, checkpoint, device="cpu")
    return embedder.embed


# ---------------------------------------------------------------- batches
def pretrain_batches(shards: Path, tokens, batching: str, pad_to_max: bool, length_step: int = 64):
    """Every batch of epoch 0 as the trainer builds it."""
    from ricefm.batching import BatchStream
    from ricefm.shards import ShardedCells

    stream = BatchStream(ShardedCells(shards), tokens, PRETRAIN_BATCH, SEQ, (0.25, 0.5, 0.75), seed=0, prefetch=0,
                         pad_to_max=pad_to_max, batching=batching, n_epochs=1, length_step=length_step)
    return [stream.batch(0, s) for s in range(stream.steps_in_epoch(0))]


def finetune_batches(ref, tokens, batching: str):
    from ricefm.batching import bucketed_order

    cells, n = ref.cells, len(ref.y)
    if batching == "bucketed":
        order = bucketed_order(cells.lengths, 0, 0, FINETUNE_BATCH)
    else:
        order = np.random.default_rng(0).permutation(n)
    out = []
    for i in range(0, n - FINETUNE_BATCH + 1, FINETUNE_BATCH):
        rows = order[i:i + FINETUNE_BATCH]
        b = cells.batch(rows, tokens, SEQ, "highest", 32)
        b["labels"] = ref.y[rows]
        out.append(b)
    return out


def embed_batches(ref, tokens, batching: str):
    """``ricefm embed``'s batches (sorted by length) or the published tutorials' (cells in file order)."""
    from ricefm.embed import LENGTH_MULTIPLE

    cells = ref.cells
    order = (np.argsort(np.minimum(cells.lengths, EMBED_SEQ - 1), kind="stable") if batching == "bucketed"
             else np.arange(len(cells)))
    multiple = LENGTH_MULTIPLE if batching == "bucketed" else 1
    return [cells.batch(order[i:i + EMBED_BATCH], tokens, EMBED_SEQ, "highest", multiple)
            for i in range(0, len(cells), EMBED_BATCH)]


def shapes(batches) -> list[list[int]]:
    return sorted({tuple(int(v.shape[1]) for k, v in sorted(b.items()) if k.endswith("key_padding_mask"))
                   for b in batches})


def spread(batches, n: int) -> list:
    """n batches evenly spaced over the epoch: a sample of its shapes, not just the first window's."""
    return [batches[i] for i in np.linspace(0, len(batches) - 1, min(n, len(batches))).round().astype(int)]


def shape_key(batch) -> tuple:
    return tuple(v.shape for k, v in sorted(batch.items()) if k.endswith("key_padding_mask"))


def _release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps them): idle workers must not hold their
    peak while another one runs, or ten of them outgrow this machine's memory."""
    import gc

    from ricefm.host_memory import release_free_pages

    gc.collect()
    release_free_pages()


def _variant_worker(conn, factory: tuple[str, tuple], batches: list, host_memory: str) -> None:
    """One variant in a process of its own, as a trainer runs one model: builds its step from
    ``factory`` (a step maker's name in this module and its arguments) and runs what it is sent,
    its host memory set up as the trainers do (``train.host_memory``)."""
    import traceback

    try:
        from ricefm.host_memory import apply_host_memory

        apply_host_memory(host_memory)  # before JAX or torch start their threads, as the trainers do
        name, args = factory
        if "torch" in name or "torch" in args:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
        step = globals()[name](*args)
        conn.send(("ready",))
        while (cmd := conn.recv())[0] != "stop":
            if cmd[0] == "peak_rss":  # the most resident memory this worker ever held (Linux: KiB)
                import resource

                conn.send(("peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
                continue
            if cmd[0] == "warmup":  # each distinct shape once (JAX compiles a program per shape)
                t, seen = time.perf_counter(), set()
                for b in batches:
                    if (key := shape_key(b)) not in seen:
                        seen.add(key)
                        step(b)
                reply = ("warmup", time.perf_counter() - t, len(seen))
            else:  # ("time", batch index, repeats)
                runs = []
                for _ in range(cmd[2]):
                    t = time.perf_counter()
                    step(batches[cmd[1]])
                    runs.append(time.perf_counter() - t)
                reply = ("time", runs)
            _release_free_memory()  # before replying: the next worker's timing starts on the reply
            conn.send(reply)
    except BaseException:  # noqa: BLE001 - the coordinator raises it with the variant's name
        conn.send(("error", traceback.format_exc()))


class _Variant:
    """The coordinator's handle on one worker process."""

    def __init__(self, ctx, name: str, factory: tuple[str, tuple], batches: list, host_memory: str):
        self.name, (self.conn, child) = name, ctx.Pipe()
        self.process = ctx.Process(target=_variant_worker, args=(child, factory, batches, host_memory), daemon=True)
        self.process.start()

    def ask(self, *cmd):
        if cmd:
            self.conn.send(cmd)
        try:
            reply = self.conn.recv()
        except EOFError:
            self.process.join(timeout=10)
            raise RuntimeError(f"variant {self.name}: its worker died (exit code {self.process.exitcode}; "
                               f"-9 is the kernel's out-of-memory kill)") from None
        if reply[0] == "error":
            raise RuntimeError(f"variant {self.name} failed in its worker:\n{reply[1]}")
        return reply

    def stop(self) -> None:
        if self.process.is_alive():
            self.conn.send(("stop",))
        self.process.join(timeout=60)


def measure_together(variants: dict[str, tuple[tuple[str, tuple], list]], flops: Callable, n: int,
                     repeats: int = REPEATS, host_memory: dict[str, str] | None = None) -> dict[str, dict]:
    """Time ``spread(batches, n)`` of every variant, interleaved: in round i each variant runs batch i,
    ``repeats`` times in a row, and its fastest run counts. First each variant runs each of its
    distinct shapes once (JAX compiles a program per shape). A slow spell of this shared machine
    then falls on all variants alike, so their ratios hold better than their absolute rates. Each
    variant runs in a process of its own (``variants`` maps a name to a step maker, as (its name
    here, its arguments), and batches), as a trainer runs one model: in one process a variant
    paid for the others' memory and runtime state (measured here: a short step +15-20% after a
    long JAX step; JAX 0.95x torch among ten variants, 1.0x alone). Only one worker runs at a
    time; the order rotates each round and the repeats absorb what is left of the switch. Workers
    keep their freed host memory (``ricefm.host_memory``) unless ``host_memory`` maps their name to
    ``release``; between commands every worker hands its free pages back, so the first repeat may
    fault them in again and a kept heap shows from the second on (as in a trainer's steady state).
    Each variant's peak resident memory is reported too."""
    import multiprocessing

    timed = {name: spread(batches, n) for name, (_, batches) in variants.items()}
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs JAX and torch threads
    workers = {name: _Variant(ctx, name, factory, timed[name], (host_memory or {}).get(name, "keep"))
               for name, (factory, _) in variants.items()}
    out: dict[str, dict] = {}
    try:
        for w in workers.values():
            w.ask()  # ready
        for name, w in workers.items():
            _, seconds, n_shapes = w.ask("warmup")
            out[name] = {"warmup_seconds": seconds, "warmup_shapes": n_shapes, "step_seconds": []}
        names = list(variants)
        for i in range(max(len(b) for b in timed.values())):
            for name in names[i % len(names):] + names[:i % len(names)]:
                if i < len(timed[name]):
                    out[name]["step_seconds"].append(min(workers[name].ask("time", i, repeats)[1]))
        for name, w in workers.items():
            out[name]["peak_rss_bytes"] = w.ask("peak_rss")[1]
    finally:
        for w in workers.values():
            w.stop()
    for name, r in out.items():
        b, sec = timed[name], float(sum(r["step_seconds"]))
        r.update(batches=len(b), seconds=sec, real_tokens_per_s=sum(token_counts(x)[0] for x in b) / sec,
                 cells_per_s=sum(len(x["mod_types"]) for x in b) / sec, model_flops_per_s=sum(map(flops, b)) / sec,
                 seconds_per_new_shape=r["warmup_seconds"] / r["warmup_shapes"])
    return out


def report(runs: dict, measured: dict, meta: dict) -> None:
    for name, r in measured.items():
        runs[name] = {**r, **meta[name]}
        print(f"{name:52s} {r['real_tokens_per_s']:8.0f} real tok/s  pad {meta[name]['padding']:.1%}", flush=True)


def epoch_padding(batches) -> float:
    real, total = np.sum([token_counts(b) for b in batches], axis=0)
    return float(1 - real / total)


# ---------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=4, help="timed batches per variant")
    p.add_argument("--workloads", default="pretrain,finetune,embed")
    p.add_argument("--corpora", default="shipped,synthetic")
    p.add_argument("--output", default=str(REPO / "benchmarks/results/throughput.json"))
    args = p.parse_args()
    import jax
    import torch

    from converters.formats import Checkpoint, write_checkpoint
    from ricefm.atomic import write_json_atomic
    from ricefm.batching import TokenSpec
    from ricefm.evaluate.annotation import annotation_config
    from ricefm.init import initial_state
    from ricefm.vocab import GeneVocab
    from ricefm_configs import ricefm_base

    torch.set_num_threads(os.cpu_count() or 1)
    workloads = args.workloads.split(",")
    base = ricefm_base.get_config().model
    vocab = GeneVocab.default()
    tokens = TokenSpec(vocab.pad_id, vocab.cls_id)
    result = {"benchmark": "throughput", "config": "ricefm_base", "precision": "fp32", "max_seq_len": SEQ,
              "batch_cells": {"pretrain": PRETRAIN_BATCH, "finetune": FINETUNE_BATCH, "embed": EMBED_BATCH},
              "synthetic_corpus": SYNTHETIC, "timing": {"repeats_per_batch": REPEATS, "counted": "fastest"},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                          "jax_backend": jax.default_backend(), "torch": torch.__version__},
              "flops_formula": __doc__.split("Model FLOPs")[1].split("MFU vs")[0].strip()}
    t0 = time.perf_counter()
    result["gemm_flops_per_s"] = gemm_rates()
    result["dropout_mask_seconds"] = mask_costs()
    print("GEMM", {k: f"{v / 1e9:.0f} GFLOP/s" for k, v in result["gemm_flops_per_s"].items()}, flush=True)
    print("masks", result["dropout_mask_seconds"], flush=True)
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synthetic_h5ad(work / "synthetic.h5ad", vocab)
        ckpt = work / "base_seed"
        write_checkpoint(Checkpoint(initial_state(base, len(vocab), seed=0), base, vocab, "seed"), ckpt, "seed")
        cfg = annotation_config()
        sources = {"shipped": REPO / "ricefm/resources/rice_root_SRP309176_2k.h5ad", "synthetic": work / "synthetic.h5ad"}
        corpora = {name: corpus(name, sources[name], work, vocab, cfg) for name in args.corpora.split(",")}
        result["corpora_run"], result["workloads_run"] = args.corpora.split(","), workloads
        for cname, (shards, ref) in corpora.items():
            lengths = ref.cells.lengths
            result.setdefault("corpora", {})[cname] = {
                "cells": int(len(lengths)), "median_genes": float(np.median(lengths)),
                "p90_genes": float(np.percentile(lengths, 90)), "max_genes": int(lengths.max())}
            if "pretrain" in workloads:
                cache = {(b, pad): pretrain_batches(shards, tokens, b, pad) for b, pad in
                         (("published", False), ("published", True), ("bucketed", False))}
                variants, meta, memory = {}, {}, {}
                for backend, make in (("torch", "torch_pretrain_step"), ("jax", "jax_pretrain_step")):
                    kinds = [("published", "framework", 0.2, "keep"), ("bucketed", "fast", 0.2, "keep"),
                             ("bucketed", "fast", 0.0, "keep")]
                    if cname == "shipped":  # each change alone, and glibc's default host memory
                        kinds += [("published", "fast", 0.2, "keep"), ("bucketed", "framework", 0.2, "keep"),
                                  ("bucketed", "fast", 0.2, "release")]
                    for batching, masks, dropout, host_memory in kinds:
                        batches = cache[batching, backend == "jax" and batching == "published"]
                        name = f"pretrain/{cname}/{backend}/{batching}/{masks}/dropout{dropout}"
                        if host_memory == "release":
                            name += "/release"
                            memory[name] = "release"
                        variants[name] = ((make, (len(vocab), dropout, masks)), batches)
                        meta[name] = dict(padding=epoch_padding(batches), programs=len(shapes(batches)),
                                          lengths=[a + b for a, b in shapes(batches)] if backend == "jax" else None)
                report(runs, measure_together(variants, lambda b: pretrain_flops(b, base), args.batches,
                                              host_memory=memory), meta)
                result.setdefault("length_steps", {})[cname] = {
                    str(step): {"programs": len(shapes(b)), "padding": epoch_padding(b)}
                    for step in LENGTH_STEPS for b in [pretrain_batches(shards, tokens, "bucketed", False, step)]}
                print("length_step -> programs, padding:", result["length_steps"][cname], flush=True)
            if "finetune" in workloads:
                variants, meta = {}, {}
                for backend in ("torch", "jax"):
                    for batching in ("published", "bucketed"):
                        masks = "framework" if batching == "published" else "fast"
                        batches = finetune_batches(ref, tokens, batching)
                        name = f"finetune/{cname}/{backend}/{batching}/{masks}/dropout0.2"
                        variants[name] = (("finetune_step", (backend, ckpt, len(ref.class_names), masks)), batches)
                        meta[name] = dict(padding=epoch_padding(batches), programs=len(shapes(batches)))
                report(runs, measure_together(variants, lambda b: pcpt_flops(b, base, True), args.batches), meta)
            if "embed" in workloads:
                variants, meta = {}, {}
                for backend in ("torch", "jax"):
                    for batching in ("published", "bucketed"):
                        batches = embed_batches(ref, tokens, batching)
                        name = f"embed/{cname}/{backend}/{batching}"
                        variants[name] = (("embed_step", (backend, ckpt)), batches)
                        meta[name] = dict(padding=epoch_padding(batches), programs=len(shapes(batches)))
                report(runs, measure_together(variants, lambda b: pcpt_flops(b, base, False), args.batches), meta)
    gemm = result["gemm_flops_per_s"]
    best32, best16 = max(gemm["torch_float32"], gemm["jax_float32"]), max(gemm["torch_bfloat16"], gemm["jax_bfloat16"])
    for r in runs.values():
        r["mfu_vs_fp32_gemm"] = r["model_flops_per_s"] / best32
        r["mfu_vs_bf16_gemm"] = r["model_flops_per_s"] / best16
    result["runs"] = runs
    result["ratios"] = ratios(runs)
    result["seconds"] = time.perf_counter() - t0
    write_json_atomic(args.output, result)
    print(json.dumps(result["ratios"], indent=2))


def ratios(runs: dict) -> dict:
    """The comparisons the targets are about, each from runs of this one benchmark run."""
    out = {}

    def rate(name):
        return runs[name]["real_tokens_per_s"] if name in runs else None

    for corpus_name in ("shipped", "synthetic"):
        for backend in ("torch", "jax"):
            pre = f"pretrain/{corpus_name}/{backend}"
            now, today = rate(f"{pre}/bucketed/fast/dropout0.2"), rate(f"{pre}/published/framework/dropout0.2")
            off = rate(f"{pre}/bucketed/fast/dropout0.0")
            released = rate(f"{pre}/bucketed/fast/dropout0.2/release")
            if now and released:
                out[f"{pre}: host memory keep / release (real tokens/s)"] = now / released
            if now and today:
                out[f"{pre}: now / before (real tokens/s)"] = now / today
            if now and off:
                out[f"{pre}: dropout 0.2 step time / dropout 0"] = off / now
        for workload in ("finetune", "embed"):
            for backend in ("torch", "jax"):
                pre = f"{workload}/{corpus_name}/{backend}"
                a = [n for n in runs if n.startswith(pre + "/bucketed")]
                b = [n for n in runs if n.startswith(pre + "/published")]
                if a and b:
                    out[f"{pre}: bucketed / published (real tokens/s)"] = rate(a[0]) / rate(b[0])
        j, t = rate(f"pretrain/{corpus_name}/jax/bucketed/fast/dropout0.2"), \
            rate(f"pretrain/{corpus_name}/torch/bucketed/fast/dropout0.2")
        if j and t:
            out[f"pretrain/{corpus_name}: jax / torch (real tokens/s)"] = j / t
    return out


if __name__ == "__main__":
    main()
