"""Cell-type prediction with a fine-tuned torch model (the backend side of ``ricefm annotate``):
class logits from the ``cls_decoder`` head and the fine-tuned encoder's cell embedding, one forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from converters.formats import load_finetuned
from ricefm.batching import PCPT_INPUTS
from ricefm_npu import compat, devices
from ricefm_npu.checkpoints import model_from_checkpoint


class TorchClassifier:
    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        compat.check_runtime()
        self.device = devices.resolve_device(device)
        ckpt = load_finetuned(checkpoint)
        self.model = model_from_checkpoint(ckpt, checkpoint, attention=devices.default_attention(self.device))
        self.model.to(self.device).eval()
        self.model_config, self.vocab, self.finetune = ckpt.model, ckpt.vocab, ckpt.finetune
        self.description = f"torch {torch.__version__} on {self.device}"

    @torch.no_grad()
    def classify(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        t = {k: torch.from_numpy(batch[k]).to(self.device) for k in PCPT_INPUTS}
        out = self.model(t["gene_ids"], t["values"], t["key_padding_mask"], t["mod_types"], do_mvc=False)
        return out["cls_output"].float().cpu().numpy(), out["cell_emb"].float().cpu().numpy()
