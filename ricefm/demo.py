"""End-to-end demo on the shipped rice root-tip data: build shards, then stream training batches.

    python -m ricefm.demo --config configs/tiny.py --workdir demo_out [--config.data.batch_size=16]
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from ricefm.batching import BatchStream, TokenSpec, collate_pcpt
from ricefm.errors import RiceFMInputError
from ricefm.shards import ShardedCells
from ricefm.shards.build import BuildOptions, build_dataset, format_summary

DEMO_H5AD = "rice_root_SRP309176_2k.h5ad"
_REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

_CONFIG = config_flags.DEFINE_config_file("config", str(_REPO_CONFIGS / "tiny.py"), "ml-collections config file")
_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "where the demo writes its dataset")


def run(config, workdir: Path) -> None:
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


def main(argv) -> None:
    del argv
    try:
        run(_CONFIG.value, Path(_WORKDIR.value))
    except RiceFMInputError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main)
