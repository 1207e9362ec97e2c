"""Cell embeddings with the torch model (the backend side of ``ricefm embed --backend torch``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ricefm.batching import PCPT_INPUTS
from ricefm_npu import compat, devices
from ricefm_npu.checkpoints import load_torch_checkpoint


class TorchEmbedder:
    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        compat.check_runtime()
        self.device = devices.resolve_device(device)
        self.model, self.model_config, self.vocab = load_torch_checkpoint(
            checkpoint, attention=devices.default_attention(self.device))
        self.model.to(self.device).eval()
        self.description = f"torch {torch.__version__} on {self.device}"

    @torch.no_grad()
    def embed(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        t = {k: torch.from_numpy(batch[k]).to(self.device) for k in PCPT_INPUTS}
        out = self.model(t["gene_ids"], t["values"], t["key_padding_mask"], t["mod_types"], do_mvc=False)
        return out["cell_emb"].float().cpu().numpy()
