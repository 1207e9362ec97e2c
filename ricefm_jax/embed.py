"""Cell embeddings with the Flax model (the backend side of ``ricefm embed --backend jax``)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ricefm_jax.checkpoints import load_flax_model


class JaxEmbedder:
    def __init__(self, checkpoint: str | Path, attention: str = "dot_product"):
        self.model, self.model_config, self.vocab = load_flax_model(checkpoint, attention=attention)
        self.model.eval()
        self.description = f"jax {jax.__version__} on {jax.devices()[0].platform}"

        @nnx.jit
        def cell_emb(model, gene_ids, values, padding, mods):
            return model(gene_ids, values, padding, mods, do_mvc=False)["cell_emb"]

        self._cell_emb = cell_emb

    def embed(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        out = self._cell_emb(self.model, batch["gene_ids"], batch["values"], batch["key_padding_mask"], batch["mod_types"])
        return np.asarray(out, dtype=np.float32)
