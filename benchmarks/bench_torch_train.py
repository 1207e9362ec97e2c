"""torch train-step benchmark at the base config: math vs SDPA attention, fp32 vs bf16 (CPU) or fp16 (accelerator).

    python benchmarks/bench_torch_train.py [--batch 8] [--seq 1200] [--steps 3] [--device cpu]
                                           [--output benchmarks/results/torch_train.json]

One full training step = both passes of the objective (MVC pass + cell-embedding pass), backward,
clipping and Adam, on a synthetic batch whose cells fill max_seq_len (the base-config case for
real cells with ~1.5k genes). Each (attention, precision) runs in its own process so that its peak
memory is its own. Ratios are taken within this one run.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one_config(attention: str, precision: str, dropout: float, batch: int, seq: int, steps: int,
               device_name: str) -> dict:
    import contextlib

    import numpy as np
    import torch

    from ricefm.batching import TokenSpec, collate_generative
    from ricefm.shards.reader import CellBatch
    from ricefm.vocab import GeneVocab
    from ricefm_configs import ricefm_base
    from ricefm_npu import compat, devices
    from ricefm_npu.model import RiceFM
    from ricefm_npu.objective import PretrainingObjective

    device = devices.resolve_device(device_name)
    cfg = ricefm_base.get_config()
    cfg.model.dropout = dropout
    vocab = GeneVocab.default()
    rng = np.random.default_rng(0)
    n_genes = 1500
    cells = CellBatch(indices=np.arange(batch), lengths=np.full(batch, n_genes, np.int64),
                      modality=np.zeros(batch, np.int8),
                      arrays={"gene_ids": rng.integers(0, vocab.n_genes, batch * n_genes).astype(np.int32),
                              "bins": rng.integers(1, 51, batch * n_genes).astype(np.uint8)})
    raw = collate_generative(cells, TokenSpec(vocab.pad_id, vocab.cls_id), seq, 0.5, seed=0, epoch=0)
    data = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in raw.items()
            if k not in ("gen_prob", "cell_index")}
    torch.manual_seed(0)
    model = RiceFM.from_config(cfg.model, len(vocab), attention=attention).to(device).train()
    objective = PretrainingObjective(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    amp_dtype, use_scaler = devices.amp_settings(precision, device)
    scaler = compat.grad_scaler(device, use_scaler)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    def step() -> float:
        with autocast():
            loss, _ = objective(data, cell_emb_pass=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    sec = float(np.median(times))
    tokens = int((~raw["pcpt_key_padding_mask"]).sum() + (~raw["gen_key_padding_mask"]).sum())
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"attention": attention, "precision": precision, "dropout": dropout, "step_seconds": sec, "step_seconds_all": times,
            "cells_per_s": batch / sec, "tokens_per_s": tokens / sec, "peak_memory_bytes": int(peak),
            "memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1200)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=str(REPO / "benchmarks/results/torch_train.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "attention,precision,dropout": one config
    args = p.parse_args()
    if args.one:
        attention, precision, dropout = args.one.split(",")
        print(json.dumps(one_config(attention, precision, float(dropout), args.batch, args.seq, args.steps, args.device)))
        return
    low = "bf16" if args.device == "cpu" else "fp16"
    runs = []
    # the base config (dropout 0.2, also on attention weights), then without dropout: on CPU, SDPA's fused
    # kernel does not do dropout and falls back to an unfused path
    grid = [(a, p, 0.2) for a in ("math", "sdpa") for p in ("fp32", low)] + [(a, "fp32", 0.0) for a in ("math", "sdpa")]
    for attention, precision, dropout in grid:
        r = subprocess.run([sys.executable, __file__, "--one", f"{attention},{precision},{dropout}",
                            "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                            "--device", args.device], capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{attention:5s} {precision} dropout {dropout}: {runs[-1]['step_seconds']:.2f} s/step, "
              f"{runs[-1]['cells_per_s']:.2f} cells/s, peak {runs[-1]['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
    by = {(r["attention"], r["precision"], r["dropout"]): r for r in runs}
    result = {
        "benchmark": "torch_train_step", "config": "ricefm_base", "batch": args.batch, "max_seq_len": args.seq,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": runs,
        "ratios": {f"sdpa_over_math_{prec}_dropout{d}": by[("math", prec, d)]["step_seconds"] /
                   by[("sdpa", prec, d)]["step_seconds"] for prec, d in (("fp32", 0.2), (low, 0.2), ("fp32", 0.0))}
        | {f"{low}_over_fp32_{att}": by[(att, "fp32", 0.2)]["step_seconds"] / by[(att, low, 0.2)]["step_seconds"]
           for att in ("math", "sdpa")},
        "goal": {"sdpa_over_math": 1.3},
    }
    from ricefm.atomic import write_json_atomic

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output, result)
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
