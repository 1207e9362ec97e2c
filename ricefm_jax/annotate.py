"""Cell-type prediction with a fine-tuned Flax model (the backend side of ``ricefm annotate``),
mirroring ``ricefm_npu/annotate.py``: class logits and the fine-tuned encoder's cell embedding."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from converters.formats import load_finetuned
from ricefm.batching import PCPT_INPUTS
from ricefm_jax import devices
from ricefm_jax.backend import device_description
from ricefm_jax.checkpoints import model_from_checkpoint


class JaxClassifier:
    def __init__(self, checkpoint: str | Path, device: str = "auto", attention: str = "dot_product"):
        self.device = devices.resolve_devices(device)[0]
        ckpt = load_finetuned(checkpoint)
        self.model = model_from_checkpoint(ckpt, checkpoint, attention=attention)
        nnx.update(self.model, jax.device_put(nnx.state(self.model), self.device))
        self.model.eval()
        self.model_config, self.vocab, self.finetune = ckpt.model, ckpt.vocab, ckpt.finetune
        self.description = device_description(self.device)

        @nnx.jit
        def forward(model, gene_ids, values, padding, mods):
            out = model(gene_ids, values, padding, mods, do_mvc=False)
            return out["cls_output"], out["cell_emb"]

        self._forward = forward

    def classify(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        logits, emb = self._forward(self.model, *jax.device_put([batch[k] for k in PCPT_INPUTS], self.device))
        return np.asarray(logits, np.float32), np.asarray(emb, np.float32)
