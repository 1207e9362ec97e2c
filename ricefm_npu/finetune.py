"""Cell-type annotation fine-tuning with the torch model (the backend side of
``ricefm.evaluate.annotation``): the checkpoint's encoder plus a classification head on the
cell embedding, trained with Adam + clipping in fp32, the encoder optionally frozen."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F

from converters.formats import load_checkpoint
from ricefm.batching import PCPT_INPUTS
from ricefm.evaluate.annotation import lr_factor
from ricefm_npu import compat, devices
from ricefm_npu.checkpoints import strict_load
from ricefm_npu.model import RiceFM


class TorchFinetuner:
    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        compat.check_runtime()
        self.device = devices.resolve_device(device)
        ckpt = load_checkpoint(checkpoint)
        self.state = {k: torch.from_numpy(v) for k, v in ckpt.state.items()}
        self.model_config, self.vocab, self.source = ckpt.model, ckpt.vocab, str(checkpoint)
        self.description = f"torch {torch.__version__} on {self.device}"
        self.model: RiceFM | None = None

    def start(self, head: dict[str, np.ndarray], n_classes: int, cfg: ml_collections.ConfigDict,
              steps_per_epoch: int, seed: int) -> None:
        torch.manual_seed(seed)  # dropout draws
        model_cfg = copy.deepcopy(self.model_config)
        model_cfg.dropout = float(cfg.dropout)
        self.model = RiceFM.from_config(model_cfg, len(self.vocab), attention=devices.default_attention(
            self.device, float(cfg.dropout)), n_cls=n_classes)
        strict_load(self.model, {**self.state, **{k: torch.from_numpy(v) for k, v in head.items()}}, self.source)
        self.model.to(self.device)
        self.freeze = bool(cfg.freeze_encoder)
        for name, p in self.model.named_parameters():
            p.requires_grad_(not self.freeze or name.startswith("cls_decoder."))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=float(cfg.lr))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, steps_per_epoch, float(cfg.lr_decay_per_epoch)))
        self.clip, self.params = float(cfg.grad_clip_norm), params

    def _forward(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
        t = {k: torch.from_numpy(batch[k]).to(self.device) for k in PCPT_INPUTS}
        return self.model(t["gene_ids"], t["values"], t["key_padding_mask"], t["mod_types"], do_mvc=False)["cls_output"]

    def train_step(self, batch: dict[str, np.ndarray], labels: np.ndarray, weights: np.ndarray) -> float:
        self.model.train()
        if self.freeze:  # a frozen encoder also keeps its dropout off: the head sees fixed embeddings
            self.model.eval()
        logits = self._forward(batch)
        loss = F.cross_entropy(logits, torch.from_numpy(labels).to(self.device),
                               weight=torch.from_numpy(weights).to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    @torch.no_grad()
    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        self.model.eval()
        return self._forward(batch).float().cpu().numpy()

    def snapshot(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.model.load_state_dict(snapshot)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}
