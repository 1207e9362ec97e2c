"""Integrity-check cost, written as JSON: what verification adds to opening, reading and training.

    python benchmarks/bench_integrity.py [--workdir /tmp/ricefm-bench-integrity]
                                         [--output benchmarks/results/integrity.json]

On the shipped rice cells (2,000 cells, 1.17M non-zeros), all in one run:
1. opening the dataset, the cheap check every reader makes on open (presence and size of every
   shard file, digests of the zarr metadata) and the full check a trainer adds (every digest of
   its share of the shards);
2. ``ricefm verify`` speed in MB/s (SHA-256 of every file);
3. reading every cell with the per-chunk CRC32C against the same data built without it;
4. a training epoch of the torch trainer on these cells, from measured step times (tiny config,
   and the published base architecture at batch 8), and the open-time checks as a share of it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ricefm.atomic import write_json_atomic  # noqa: E402
from ricefm.shards import ShardedCells, store  # noqa: E402
from ricefm.shards.build import build_dataset  # noqa: E402

SHIPPED = REPO / "ricefm/resources/rice_root_SRP309176_2k.h5ad"


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_without_crc(out: Path) -> None:
    """The same cells with the CRC32C codec left out (the comparison for the read cost only)."""
    original = store._metadata

    def no_crc(dtype, per_nonzero, attributes):
        meta = original(dtype, per_nonzero, attributes)
        for codec in meta["codecs"]:
            if codec["name"] == "sharding_indexed":
                codec["configuration"]["codecs"] = [c for c in codec["configuration"]["codecs"] if c["name"] != "crc32c"]
        meta["codecs"] = [c for c in meta["codecs"] if c["name"] != "crc32c"]
        return meta

    store._metadata = no_crc
    try:
        build_dataset([SHIPPED], out, progress=False)
    finally:
        store._metadata = original


def read_all(directory: Path, batch: int = 64) -> None:
    ds = ShardedCells(directory)
    for lo in range(0, len(ds), batch):
        ds.read(np.arange(lo, min(lo + batch, len(ds))), ("gene_ids", "bins", "values"))


def step_seconds(data: Path, workdir: Path, base: bool, steps: int) -> tuple[float, int]:
    """Median torch step time (after one warm-up step) and cells per step."""
    from ricefm_configs import ricefm_base, tiny
    from ricefm_npu.train import train

    cfg = (ricefm_base if base else tiny).get_config()
    cfg.data.data_dir = str(data)
    if base:
        cfg.data.batch_size = 8
    cfg.train.update({"max_steps": steps + 1, "checkpoint_every": 10_000, "log_every": 1})
    cfg.data.valid_fraction = 0.0
    shutil.rmtree(workdir, ignore_errors=True)
    out = train(cfg, workdir, device="cpu", progress=False)
    rates = [json.loads(line)["cells_per_s"] for line in (workdir / "metrics.jsonl").read_text().splitlines()][1:]
    return float(cfg.data.batch_size) / statistics.median(rates), int(cfg.data.batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/ricefm-bench-integrity")
    p.add_argument("--output", default=str(REPO / "benchmarks/results/integrity.json"))
    p.add_argument("--base-steps", type=int, default=2, help="measured steps of the base architecture (slow on CPU)")
    args = p.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data, plain = work / "data", work / "data-no-crc"
    build_dataset([SHIPPED], data, progress=False)
    build_without_crc(plain)
    ds = ShardedCells(data)
    n_cells, total_bytes = len(ds), ds.manifest.total_bytes

    open_s = timed(lambda: ShardedCells(data), 20)  # manifest + vocabulary + the cheap check
    cheap = timed(lambda: ds.problems(full=False), 20)
    full = timed(lambda: ds.problems(full=True), 10)
    from ricefm_cli.verify import verify

    verify_report = min((verify(data, progress=False) for _ in range(5)), key=lambda r: r["seconds"])
    read_crc = timed(lambda: read_all(data), 3)
    read_plain = timed(lambda: read_all(plain), 3)

    epochs = {}
    for name, base, steps in (("tiny", False, 8), ("base_batch8", True, args.base_steps)):
        seconds, cells = step_seconds(data, work / f"train-{name}", base, steps)
        epoch = seconds * n_cells / cells
        epochs[name] = {"step_s": seconds, "cells_per_step": cells, "epoch_s": epoch,
                        "open_checks_share_of_epoch": (cheap + full) / epoch}  # what a trainer adds to opening
    result = {
        "dataset": {"cells": n_cells, "non_zeros": ds.manifest.data["n_nonzero"], "shard_bytes": total_bytes,
                    "files": sum(len(s["files"]) for s in ds.manifest.shards)},
        "open_dataset_s": open_s,
        "cheap_check_s": cheap,
        "full_digest_check_s": full,
        "digest_mb_per_s": total_bytes / 1e6 / full,
        "verify": {"seconds": verify_report["seconds"], "bytes": verify_report["bytes"],
                   "mb_per_s": verify_report["mb_per_s"]},
        "read_every_cell": {"with_crc32c_s": read_crc, "without_crc32c_s": read_plain,
                            "crc_overhead": read_crc / read_plain - 1.0,
                            "cells_per_s_with_crc32c": n_cells / read_crc},
        "torch_training_epoch_cpu": epochs,
        "goal": "open-time checks < 2% of a training epoch on the shipped data",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    write_json_atomic(args.output, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
