#!/usr/bin/env bash
# CI: what a user gets from a normal (non-editable) install. Builds the wheel, installs it with the
# torch, eval and jax extras into a clean venv, and from a folder outside the repository runs every
# `ricefm` subcommand's --help, the demo's --help, shards from the shipped h5ad and a 50-cell embed
# with a tiny random checkpoint on each backend. Editable installs cannot see a subpackage missing
# from the wheel; this can. pip's cache makes reruns quick (no --no-cache-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! python3 -m pip wheel --no-deps -w "$work/dist" . > "$work/wheel.log" 2>&1; then
  cat "$work/wheel.log" >&2
  exit 1
fi
wheel=$(ls "$work"/dist/ricefm-*.whl)
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
# torch pinned to the CPU build these machines carry (an unpinned torch pulls multi-GB CUDA wheels)
"$py" -m pip install -qq --no-compile torch==2.13.0
"$py" -m pip install -qq --no-compile "${wheel}[torch,eval,jax]"
echo "wheel check: $(basename "$wheel") installed in $((SECONDS - start))s"

cd "$work"  # only the installed package is importable from here
ricefm="$work/venv/bin/ricefm"
for cmd in "" build-data embed convert benchmark verify doctor; do
  $ricefm $cmd --help > /dev/null
done
# absl exits 1 after printing --help: check what it printed instead
demo_help=$("$py" -m ricefm_cli.demo --help 2>&1 || true)
grep -q -- "--workdir" <<< "$demo_help" || { echo "python -m ricefm_cli.demo --help failed: $demo_help" >&2; exit 1; }

h5ad=$("$py" -c "from importlib import resources; print(resources.files('ricefm.resources') / 'rice_root_SRP309176_2k.h5ad')")
$ricefm build-data "$h5ad" --output data --quiet > /dev/null
$ricefm verify data --quiet > /dev/null
"$py" - "$h5ad" <<'PY'
"""A tiny random checkpoint (the published initial weights, torch format) and 50 cells of the shipped data."""
import sys

import anndata as ad

from converters.formats import Checkpoint, save_checkpoint
from ricefm.init import initial_state
from ricefm.vocab import GeneVocab
from ricefm_configs import tiny

model, vocab = tiny.get_config().model, GeneVocab.load("data/vocab.json")
save_checkpoint(Checkpoint(initial_state(model, len(vocab), seed=0), model, vocab, "torch"), "ckpt", "torch")
ad.read_h5ad(sys.argv[1])[:50].copy().write_h5ad("cells50.h5ad")
PY
for backend in torch jax; do
  $ricefm embed --checkpoint ckpt --input cells50.h5ad --output "emb_$backend.h5ad" --backend "$backend" \
    --device cpu --quiet
done
$ricefm verify ckpt --quiet > /dev/null
"$py" -c "
import anndata as ad, numpy as np
a, b = (ad.read_h5ad(f'emb_{k}.h5ad').obsm['X_ricefm'] for k in ('torch', 'jax'))
assert a.shape == (50, 64) and np.allclose(a, b, atol=1e-4), 'torch and jax embeddings differ'"
echo "wheel check passed in $((SECONDS - start))s"
