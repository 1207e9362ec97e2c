"""The evaluation suite on a briefly pretrained checkpoint: the numbers behind the README's table.

    python benchmarks/bench_evaluation.py [--workdir /tmp/ricefm_eval] [--steps 2400] [--device cpu]
        [--output benchmarks/results/evaluation_rice_root] [--annotation KEY=VALUE ...]

Builds shards of the shipped rice root-tip data, pretrains the tiny config with the torch backend
(max_seq_len 256, batch 16: about 7 minutes on 2 CPU cores), then runs ``ricefm benchmark`` on it
for both backends with the default annotation settings, writing report.json / report.md / the
PNGs to ``--output``. Each step is skipped or resumed when ``--workdir`` already holds its result.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pretrain(data_dir: Path, run_dir: Path, steps: int, device: str) -> Path:
    from configs import tiny
    from ricefm_npu.train import train

    best = run_dir / "best"
    if (run_dir / "done").exists():
        print(f"reusing the finished pretraining in {run_dir}")
        return best
    cfg = tiny.get_config()
    cfg.data.data_dir = str(data_dir)
    cfg.data.max_seq_len = 256
    cfg.data.batch_size = 16
    cfg.train.max_steps = steps
    cfg.train.checkpoint_every = max(1, steps // 6)
    summary = train(cfg, run_dir, device=device, resume=(run_dir / "checkpoints" / "latest").exists())
    print(f"pretrained {summary['steps']} steps; best validation loss {summary['best_valid']:.2f}")
    (run_dir / "done").write_text(f"{summary['steps']}\n")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ricefm_eval"))
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "evaluation_rice_root")
    p.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE",
                   help="annotation setting overrides, as for `ricefm benchmark` (e.g. max_epochs=2)")
    args = p.parse_args()

    from ricefm.evaluate.annotation import annotation_config
    from ricefm.evaluate.datasets import resolve_dataset
    from ricefm.evaluate.report import markdown
    from ricefm_cli.benchmark import run_benchmark
    from ricefm_cli.demo import DEMO_H5AD
    from ricefm.shards.build import BuildOptions, build_dataset

    data_dir = args.workdir / "data"
    with resources.as_file(resources.files("ricefm.resources").joinpath(DEMO_H5AD)) as h5ad:
        build_dataset([h5ad], data_dir, options=BuildOptions(keep_obs=("celltype", "sample")))
    t0 = time.perf_counter()
    best = pretrain(data_dir, args.workdir / "pretrain", args.steps, args.device)
    t1 = time.perf_counter()
    report = run_benchmark(best, resolve_dataset("rice_root"), ["jax", "torch"], args.output, device=args.device,
                           annotation=annotation_config(args.annotation))  # swaps the whole folder in when done
    print(markdown(report))
    print(f"pretraining {t1 - t0:.0f}s, evaluation {time.perf_counter() - t1:.0f}s")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
