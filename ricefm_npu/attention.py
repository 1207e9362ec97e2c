"""Multi-head attention kernels behind one switch: exact math, torch SDPA, Ascend fusion attention.

Every kernel takes q (B, H, Lq, hd), k and v (B, H, Lk, hd) and a bool ``masked`` broadcastable
to (B, H, Lq, Lk) that is True where a key must be ignored, and returns (B, H, Lq, hd). They are
drop-ins for each other (tested against ``math``); scale is 1/sqrt(hd) and attention-weight
dropout is ``dropout_p`` in training (``math`` draws its masks with ``ricefm_npu.dropout``, the
fused kernels with their own generators).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ricefm_npu.dropout import apply_dropout

IMPLEMENTATIONS = ("math", "sdpa", "npu_fusion")


def masked_scores(q: torch.Tensor, k: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """q k^T / sqrt(hd), -inf where ``masked``. The scale goes on q (hd / Lk the size of the scores)
    and the mask is added in place as a 0 / -inf bias, whose backward passes the gradient through:
    two fewer passes over the (B, H, Lq, Lk) scores each way than scaling and ``masked_fill``."""
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2))
    bias = torch.zeros(masked.shape, dtype=scores.dtype, device=scores.device).masked_fill_(masked, float("-inf"))
    return scores.add_(bias)


def math_attention(q, k, v, masked, dropout_p: float = 0.0, training: bool = False, fast_dropout: bool = True):
    probs = torch.softmax(masked_scores(q, k, masked), dim=-1)
    if training and dropout_p > 0:  # the 1/(1-p) factor goes on the (B, H, Lq, hd) result
        return torch.matmul(apply_dropout(probs, dropout_p, True, scale=False, fast=fast_dropout), v) * (1.0 / (1.0 - dropout_p))
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, masked, dropout_p: float = 0.0, training: bool = False, fast_dropout: bool = True):
    # SDPA's bool mask is True where attention is ALLOWED
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~masked, dropout_p=dropout_p if training else 0.0)


def npu_fusion_attention(q, k, v, masked, dropout_p: float = 0.0, training: bool = False,
                         fast_dropout: bool = True):
    """``torch_npu.npu_fusion_attention`` in BNSD layout; its bool ``atten_mask`` is True = masked."""
    from ricefm_npu.devices import import_torch_npu

    torch_npu = import_torch_npu()
    B, H, Lq, hd = q.shape
    mask = masked.expand(B, 1 if masked.shape[1] == 1 else H, Lq, k.shape[2]).contiguous()
    out = torch_npu.npu_fusion_attention(
        q, k, v, H, input_layout="BNSD", atten_mask=mask, scale=1.0 / math.sqrt(hd),
        keep_prob=1.0 - (dropout_p if training else 0.0))
    return out[0]


_KERNELS = {"math": math_attention, "sdpa": sdpa_attention, "npu_fusion": npu_fusion_attention}


def get_attention(name: str):
    if name not in _KERNELS:
        raise ValueError(f"attention {name!r} is not one of {IMPLEMENTATIONS}")
    return _KERNELS[name]
