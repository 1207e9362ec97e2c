"""Cell embeddings with the Flax model (the backend side of ``ricefm embed --backend jax``).

Mirrors ``ricefm_npu/embed.py``: ``device`` takes the same choices as the torch backend
(``ricefm_jax.devices``); the weights and every batch are placed on that device.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ricefm.batching import PCPT_INPUTS
from ricefm_jax import devices
from ricefm_jax.backend import device_description
from ricefm_jax.checkpoints import load_flax_model


class JaxEmbedder:
    def __init__(self, checkpoint: str | Path, device: str = "auto", attention: str = "dot_product"):
        self.device = devices.resolve_devices(device)[0]
        self.model, self.model_config, self.vocab = load_flax_model(checkpoint, attention=attention)
        nnx.update(self.model, jax.device_put(nnx.state(self.model), self.device))
        self.model.eval()
        self.description = device_description(self.device)

        @nnx.jit
        def cell_emb(model, gene_ids, values, padding, mods):
            return model(gene_ids, values, padding, mods, do_mvc=False)["cell_emb"]

        self._cell_emb = cell_emb

    def embed(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = jax.device_put([batch[k] for k in PCPT_INPUTS], self.device)
        return np.asarray(self._cell_emb(self.model, *inputs), dtype=np.float32)
