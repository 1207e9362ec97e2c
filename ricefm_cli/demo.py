"""End-to-end demo on the shipped rice root-tip data: build shards, stream training batches,
pretrain the tiny model briefly with the torch backend, embed the cells with it, and run the
evaluation suite (zero-shot scib metrics and annotation fine-tuning) with both backends.

    python -m ricefm_cli.demo --config configs/tiny.py --workdir demo_out [--train_steps 200] [--evaluate] [--config.x=y]

The backends are reached through the registry (``ricefm.backends``), only in the steps that use them.
"""

from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

import ricefm_configs
from ricefm.backends import get_backend
from ricefm.batching import BatchStream, TokenSpec, collate_pcpt
from ricefm.errors import RiceFMInputError
from ricefm.shards import ShardedCells
from ricefm.shards.build import BuildOptions, build_dataset, format_summary

DEMO_H5AD = "rice_root_SRP309176_2k.h5ad"
_TINY = Path(ricefm_configs.__file__).resolve().parent / "tiny.py"  # configs/ (installed as ricefm_configs)

_CONFIG = config_flags.DEFINE_config_file("config", str(_TINY), "ml-collections config file")
_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "where the demo writes its dataset, checkpoints, embeddings")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 200, "torch pretraining steps (0 = skip pretraining and evaluation)")
_EVALUATE = flags.DEFINE_boolean("evaluate", True, "run `ricefm benchmark` on the pretrained checkpoint")
_BACKENDS = flags.DEFINE_list("backends", ["jax", "torch"], "backends the evaluation compares")
DEMO_ANNOTATION = ("max_epochs=5",)  # half the default epochs: the demo stays a few minutes


def run(config, workdir: Path, train_steps: int = 200, evaluate: bool = True,
        backends: tuple[str, ...] = ("jax", "torch")) -> None:
    data_dir = workdir / "data"
    with resources.as_file(resources.files("ricefm.resources").joinpath(DEMO_H5AD)) as h5ad:
        manifest = build_dataset([h5ad], data_dir, options=BuildOptions(keep_obs=("celltype", "sample"),
                                                                       cells_per_shard=1000))
    print(format_summary(manifest, data_dir))

    ds = ShardedCells(data_dir)
    tokens = TokenSpec(pad_id=ds.vocab.pad_id, cls_id=ds.vocab.cls_id, pad_value=config.model.pad_value)
    stream = BatchStream(ds, tokens, config.data.batch_size, config.data.max_seq_len, config.data.gen_ratios,
                         seed=config.data.seed, n_epochs=1)
    t0, n_batches, n_cells = time.perf_counter(), 0, 0
    for batch in stream:
        if n_batches == 0:
            print(f"first generative batch (epoch 0, step 0, gen ratio {float(batch['gen_prob'])}):")
            for k, v in batch.items():
                if getattr(v, "ndim", 0) >= 1:
                    print(f"  {k:24s} {str(v.shape):12s} {v.dtype}")
        n_batches += 1
        n_cells += len(batch["cell_index"])
    dt = time.perf_counter() - t0
    print(f"one epoch: {n_batches} batches of {config.data.batch_size} (max_seq_len {config.data.max_seq_len}) "
          f"in {dt:.2f}s = {n_cells / dt:,.0f} cells/s")
    emb = collate_pcpt(ds.read(range(4)), tokens, config.data.max_seq_len, selection="highest")
    print(f"embedding batch (pcpt-only, highest-expressed genes first kept): gene_ids {emb['gene_ids'].shape}")
    codes, cats = ds.obs_codes("celltype")
    print(f"cell types kept for evaluation: {len(cats)} ({', '.join(cats[:4])}, ...)")
    if train_steps > 0:
        pretrain_and_embed(config, workdir, data_dir, train_steps)
        if evaluate:
            benchmark(workdir, backends)


def pretrain_and_embed(config, workdir: Path, data_dir: Path, train_steps: int) -> None:
    from ricefm.embed import embed_h5ad, load_embedder

    config.data.data_dir = str(data_dir)
    config.train.max_steps = train_steps
    config.train.checkpoint_every = max(1, train_steps // 2)
    run_dir = workdir / "torch_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = get_backend("torch").train(config, run_dir, device="auto")
    h = summary["history"]
    print(f"pretrained {summary['steps']} steps on {summary['device']} ({summary['attention']} attention): "
          f"loss {h[0]['loss_total']:.1f} -> {h[-1]['loss_total']:.1f}, best validation {summary['best_valid']:.1f}; "
          f"checkpoints in {run_dir}")
    embedder = load_embedder("torch", run_dir / "best", device="auto")
    with resources.as_file(resources.files("ricefm.resources").joinpath(DEMO_H5AD)) as h5ad:
        info = embed_h5ad(h5ad, workdir / "embeddings.h5ad", embedder, batch_size=64)  # the published protocol
    print(f"embedded {info['cells']:,} cells -> {workdir / 'embeddings.h5ad'} obsm['X_ricefm'] "
          f"({int(config.model.d_model)} dims; <cls> + up to {info['max_seq_len'] - 1:,} genes a cell)")


def benchmark(workdir: Path, backends: tuple[str, ...]) -> None:
    from ricefm.evaluate.annotation import annotation_config
    from ricefm.evaluate.datasets import resolve_dataset
    from ricefm.evaluate.report import markdown
    from ricefm_cli.benchmark import run_benchmark

    out = workdir / "benchmark"
    report = run_benchmark(workdir / "torch_run" / "best", resolve_dataset("rice_root"), list(backends), out,
                           device="auto", annotation=annotation_config(DEMO_ANNOTATION))
    print(markdown(report))
    print(f"evaluation report, UMAPs and confusion matrices in {out}")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # jax logs its platform probing (no TPU) at INFO
    try:
        run(_CONFIG.value, Path(_WORKDIR.value), _TRAIN_STEPS.value, _EVALUATE.value, tuple(_BACKENDS.value))
    except RiceFMInputError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main)
