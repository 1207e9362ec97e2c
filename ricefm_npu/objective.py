"""The riceFM pretraining objective (DESIGN.md section 4), every component reported.

total = MSE(gen predictions) + MSE(MVC predictions on the gen part)
        + MSE(gen predictions of a second pass whose <cls> input is the detached cell embedding)
over non-padded gen positions. The second pass runs from step ``cell_emb_pass_after`` on.
"""

from __future__ import annotations

import torch
from torch import nn

from ricefm.batching import GENERATIVE_INPUTS


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of squared errors over ``mask`` / mask count (inputs masked first, as published).

    ``denominator`` replaces the local count, e.g. by the global count / world size so that
    data-parallel gradients (averaged over ranks) equal those of one process on the whole batch.
    """
    m = mask.to(pred.dtype)
    return ((pred * m - target * m) ** 2).sum() / (m.sum() if denominator is None else denominator)


def pretraining_loss(model: nn.Module, batch: dict[str, torch.Tensor], cell_emb_pass: bool = True,
                     denominator: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one generative batch and its components (detached), e.g. for logging."""
    inputs = {k: batch[k] for k in GENERATIVE_INPUTS}
    target = batch["gen_target_values"]
    mask = ~batch["gen_key_padding_mask"]
    out = model(**inputs, do_mvc=True)
    pcpt_len = batch["pcpt_gene_ids"].shape[1]
    parts = {"mse": masked_mse(out["gen_preds"].float(), target, mask, denominator),
             "mvc": masked_mse(out["mvc_output"][:, pcpt_len:].float(), target, mask, denominator)}
    if cell_emb_pass:
        out2 = model(**inputs, do_mvc=False, input_cell_emb=out["cell_emb"].detach())
        parts["gen"] = masked_mse(out2["gen_preds"].float(), target, mask, denominator)
    total = sum(parts.values())
    return total, {"total": total.detach(), **{k: v.detach() for k, v in parts.items()}}


class PretrainingObjective(nn.Module):
    """The model and its two-pass loss as one module, so DDP sees a single forward per step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], cell_emb_pass: bool = True,
                denominator: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return pretraining_loss(self.model, batch, cell_emb_pass, denominator)
