"""Data-path benchmark: build-data cells/s and loader cells/s, written as JSON.

    python benchmarks/bench_data.py [--cells 200000] [--genes 20000] [--nnz-per-cell 1500]
                                    [--workdir /tmp/ricefm-bench] [--output benchmarks/results/data.json]

1. writes (once, cached in --workdir) a synthetic sparse h5ad with realistic sparsity: genes drawn
   from a skewed (log-normal) popularity, ~1.5k non-zero genes per cell, negative-binomial counts;
2. times ``build_dataset`` end to end (validation, reading, mapping, binning, TensorStore writes);
3. times the generative-batch loader at the base config (batch 64, max_seq_len 1200) with and
   without the prefetch thread, and its two parts alone (shard reads; collation in memory);
4. compares the loader with what one training process consumes at the base config, estimated
   from the model's FLOPs per cell and an accelerator's sustained FLOP/s (stated in the JSON;
   the torch/JAX step benchmarks of later issues measure it directly).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ricefm.atomic import write_json_atomic  # noqa: E402
from ricefm.batching import BatchStream, TokenSpec, collate_generative  # noqa: E402
from ricefm.shards import ShardedCells  # noqa: E402
from ricefm.shards.build import BuildOptions, build_dataset  # noqa: E402
from ricefm.vocab import GeneVocab  # noqa: E402


def write_synthetic_h5ad(path: Path, n_cells: int, n_genes: int, nnz_per_cell: int, seed: int = 0) -> None:
    """CSR h5ad written block by block with h5py (the whole matrix never exists in memory)."""
    rng = np.random.default_rng(seed)
    popularity = np.sort(rng.lognormal(0, 1.5, n_genes))[::-1]
    cdf = np.cumsum(popularity) / popularity.sum()
    tmp = path.with_suffix(".tmp.h5ad")
    genes = [f"LOC_Os{1 + i // 5000:02d}g{i % 5000:05d}" for i in range(n_genes)]
    with h5py.File(tmp, "w") as f:
        ad.io.write_elem(f, "obs", pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))
        ad.io.write_elem(f, "var", pd.DataFrame(index=genes))
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        g.attrs["shape"] = (n_cells, n_genes)
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = [np.zeros(1, np.int64)]
        total = 0
        block = 5000
        for lo in tqdm(range(0, n_cells, block), desc="synthetic h5ad", unit="block"):
            n = min(block, n_cells - lo)
            draws = np.searchsorted(cdf, rng.random((n, int(nnz_per_cell * 1.35))))
            draws = np.minimum(np.sort(draws, axis=1), n_genes - 1)
            keep = np.ones_like(draws, bool)
            keep[:, 1:] = draws[:, 1:] != draws[:, :-1]
            counts = keep.sum(1)
            cols = draws[keep].astype(np.int32)
            vals = (rng.negative_binomial(1, 0.35, size=len(cols)) + 1).astype(np.float32)
            data.resize((total + len(cols),))
            indices.resize((total + len(cols),))
            data[total:] = vals
            indices[total:] = cols
            total += len(cols)
            indptr.append(indptr[-1][-1] + np.cumsum(counts))
        g.create_dataset("indptr", data=np.concatenate(indptr))
    os.replace(tmp, path)


def flops_per_cell(d: int, d_hid: int, layers: int, seq: int, gen_ratio: float = 0.5) -> float:
    """Training FLOPs per cell at the base config: forward x3 (backward), two passes per step
    (the MVC pass and the cell-embedding pass), dense matmuls + attention scores/values."""
    gen = int((seq - 1) * gen_ratio)
    pcpt = seq - gen
    per_token_layer = 2 * (3 * d * d + 2 * d * d_hid)  # Wqkv + FFN
    per_layer = seq * per_token_layer + pcpt * 2 * d * d  # out_proj on pcpt only
    per_layer += 4 * d * (pcpt * pcpt + gen * (pcpt + 1))  # QK^T and AV
    heads = seq * 2 * (3 * d * d + d) + seq * 2 * 2 * d * d  # value/decoder/MVC heads
    forward = layers * per_layer + heads
    return 2 * 3 * forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--nnz-per-cell", type=int, default=1500)
    p.add_argument("--workdir", default="/tmp/ricefm-bench")
    p.add_argument("--output", default=str(REPO / "benchmarks/results/data.json"))
    p.add_argument("--loader-batches", type=int, default=300)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="loader processes for the multi-process run")
    p.add_argument("--accelerator-tflops", type=float, default=100.0,
                   help="sustained training FLOP/s of one accelerator, in TFLOP/s (Ascend 910B / A100 class at ~35%% MFU)")
    args = p.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    h5ad = work / f"synthetic_{args.cells}x{args.genes}_{args.nnz_per_cell}.h5ad"
    if not h5ad.exists():
        write_synthetic_h5ad(h5ad, args.cells, args.genes, args.nnz_per_cell)
    vocab_path = work / "vocab.json"
    with h5py.File(h5ad, "r") as f:
        genes = ad.io.read_elem(f["var"]).index.tolist()
    GeneVocab.from_genes(genes).save(vocab_path)

    out = work / "dataset"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = build_dataset([h5ad], out, vocab_path=vocab_path, options=BuildOptions())
    build_s = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())

    ds = ShardedCells(out)
    tokens = TokenSpec(pad_id=ds.vocab.pad_id, cls_id=ds.vocab.cls_id)
    loader = {}
    for name, prefetch, workers in (("thread_prefetch_4", 4, 0), ("no_prefetch", 0, 0),
                                    (f"processes_{args.workers}", 4, args.workers)):
        stream = BatchStream(ds, tokens, batch_size=64, max_seq_len=1200, gen_ratios=(0.25, 0.5, 0.75), seed=0,
                             prefetch=prefetch, num_workers=workers)
        it = iter(stream)
        next(it)  # open arrays, warm caches
        t0 = time.perf_counter()
        tokens_seen = 0
        for _ in tqdm(range(args.loader_batches), desc=f"loader {name}", unit="batch"):
            b = next(it)
            tokens_seen += int((~b["pcpt_key_padding_mask"]).sum() + (~b["gen_key_padding_mask"]).sum())
        dt = time.perf_counter() - t0
        loader[name] = {"cells_per_s": 64 * args.loader_batches / dt,
                                          "tokens_per_s": tokens_seen / dt, "batches": args.loader_batches}
    # where a batch's time goes: the shard reads alone, and collation of batches already in memory
    order = np.random.default_rng(0).permutation(len(ds))[:64 * args.loader_batches].reshape(-1, 64)
    t0 = time.perf_counter()
    read = [ds.read(np.sort(rows)) for rows in order]
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, cells in enumerate(read):
        collate_generative(cells, tokens, 1200, (0.25, 0.5, 0.75)[i % 3], 0, 0)
    collate_s = time.perf_counter() - t0
    loader["parts"] = {"read_cells_per_s": order.size / read_s, "collate_cells_per_s": order.size / collate_s}
    train_flops = flops_per_cell(256, 256, 6, 1200)
    consume = args.accelerator_tflops * 1e12 / train_flops
    result = {
        "benchmark": "data",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "synthetic": {"cells": args.cells, "genes": args.genes, "nnz_per_cell_target": args.nnz_per_cell,
                      "nnz_per_cell": manifest["n_nonzero"] / manifest["n_cells"], "h5ad_bytes": h5ad.stat().st_size},
        "build": {"seconds": build_s, "cells_per_s": manifest["n_cells"] / build_s,
                  "nonzeros_per_s": manifest["n_nonzero"] / build_s, "dataset_bytes": disk,
                  "bytes_per_nonzero": disk / manifest["n_nonzero"], "shards": len(manifest["shards"]),
                  "target_cells_per_s": 10_000},
        "loader": {"batch_size": 64, "max_seq_len": 1200, **loader},
        "training_consumption_estimate": {
            "train_flops_per_cell": train_flops, "accelerator_tflops_sustained": args.accelerator_tflops,
            "cells_per_s": consume,
            "loader_over_consumption": {k: v["cells_per_s"] / consume for k, v in loader.items() if k != "parts"},
            "target_ratio": 10},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
