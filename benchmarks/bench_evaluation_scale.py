"""Zero-shot metrics and the PCA baseline at the scale of real studies: time and peak memory, as JSON.

    python benchmarks/bench_evaluation_scale.py [--sizes 10000,50000,100000]
                                                [--output benchmarks/results/evaluation_scale.json]

Each size runs in a fresh process (so its peak RSS is its own) on synthetic cells with realistic
structure:
- 15 cell types in 4 lineages, with log-normal type sizes (a few common types and rare ones);
- a 256-d embedding (the base model's width): lineage centre + type offset + cell noise;
- raw counts over 20,000 genes: 1,000 draws per cell (~800 distinct non-zero genes) from a
  log-normal gene popularity shared by all cells, plus a 100-gene program per type and per lineage.

It times ``pca_baseline`` (normalize, log1p, 2k HVGs, 50 PCs) and ``zero_shot_metrics`` on the
embedding and on the PCA: kNN graph once, ten Leiden resolutions, silhouette on a seeded
20,000-cell subsample. The goal is 100k cells in under 10 minutes and 8 GB on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

N_TYPES, N_LINEAGES, N_GENES, GENES_PER_CELL, D = 15, 4, 20_000, 1_000, 256


def synthetic(n: int, seed: int = 0):
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(0, 1.0, N_TYPES)
    y = rng.choice(N_TYPES, n, p=sizes / sizes.sum())
    lineage = np.arange(N_TYPES) % N_LINEAGES
    centres = rng.normal(size=(N_LINEAGES, D)) * 1.5
    offsets = rng.normal(size=(N_TYPES, D)) * 0.8
    emb = (centres[lineage[y]] + offsets[y] + rng.normal(size=(n, D))).astype(np.float32)
    base = rng.lognormal(0, 1.5, N_GENES)
    rows, cols = [], []
    for t in range(N_TYPES):
        cells = np.flatnonzero(y == t)
        if not len(cells):
            continue
        pop = base.copy()
        pop[rng.choice(N_GENES, 100, replace=False)] *= 20  # the type's program
        pop[(lineage[t] * 100):(lineage[t] * 100 + 100)] *= 10  # its lineage's program
        draws = rng.choice(N_GENES, size=(len(cells), GENES_PER_CELL), p=pop / pop.sum())
        rows.append(np.repeat(cells, GENES_PER_CELL))
        cols.append(draws.ravel())
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    counts = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, N_GENES))
    counts.sum_duplicates()
    labels = pd.Series(np.asarray([f"type{t:02d}" for t in range(N_TYPES)])[y])
    return emb, counts, labels


def one_size(n: int) -> dict:
    from ricefm.evaluate.clustering import pca_baseline, zero_shot_metrics

    t0 = time.perf_counter()
    emb, counts, labels = synthetic(n)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    pca = pca_baseline(counts)
    pca_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m_emb = zero_shot_metrics(emb, labels)
    emb_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m_pca = zero_shot_metrics(pca, labels)
    pca_metrics_s = time.perf_counter() - t0
    return {"cells": n, "non_zeros": int(counts.nnz), "synthesis_s": made, "pca_baseline_s": pca_s,
            "zero_shot_embedding_s": emb_s, "zero_shot_pca_s": pca_metrics_s,
            "total_s": pca_s + emb_s + pca_metrics_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "metrics_embedding": m_emb, "metrics_pca": m_pca}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,50000,100000")
    p.add_argument("--output", default=str(REPO / "benchmarks/results/evaluation_scale.json"))
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child process's size
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one)))
        return
    from ricefm.atomic import write_json_atomic

    runs = []
    for n in (int(x) for x in args.sizes.split(",")):
        r = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{n} cells failed:\n{r.stderr[-3000:]}")
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{n:>7,} cells: {runs[-1]['total_s']:.0f} s, peak {runs[-1]['peak_rss_gb']:.2f} GB", flush=True)
    result = {"runs": runs, "goal": "100k cells: zero-shot metrics + PCA baseline < 10 min and < 8 GB on 2 cores",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}}
    write_json_atomic(args.output, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
