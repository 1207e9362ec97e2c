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

from ricefm_npu.dropout import apply_dropout, fast_keep_mask

IMPLEMENTATIONS = ("math", "sdpa", "npu_fusion")


def masked_bias(masked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where a key is seen, -inf where ``masked``: added to the scores, its backward passes the
    gradient through (``masked_fill`` would be one more pass over the scores each way)."""
    return torch.zeros(masked.shape, dtype=dtype, device=masked.device).masked_fill_(masked, float("-inf"))


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over keys, in place on CPU (rows are independent), where a fresh tensor of this size
    costs as much as the pass that fills it (its pages are faulted and zeroed first)."""
    if scores.device.type == "cpu":
        return torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    return torch.softmax(scores, -1)


def _matmul_with_column(a: torch.Tensor, b: torch.Tensor, column: torch.Tensor | None) -> torch.Tensor:
    """[a @ b ; column]: on CPU the product is written into the wider tensor directly (no concatenation)."""
    if column is None:
        return torch.matmul(a, b)
    if a.device.type != "cpu":
        return torch.cat([torch.matmul(a, b), column], -1)
    out = torch.empty(a.shape[:-1] + (b.shape[-1] + 1,), dtype=a.dtype, device=a.device)
    torch.matmul(a, b, out=out[..., :-1])
    out[..., -1:] = column
    return out


class SoftmaxAttention(torch.autograd.Function):
    """softmax([q k^T + bias ; extra_score]) @ [v ; extra_value], the probabilities multiplied by
    ``keep`` (attention dropout; its 1/(1-p) left to the caller) if given, in as few (B, H, Lq, Lk)
    tensors as the maths allows: forward allocates the scores, which the softmax overwrites, and
    the dropped probabilities (in the mask's own buffer, which the call consumes); backward
    allocates one gradient and works in it. Autograd's ops take three or four such tensors
    forward and three to six backward, and on CPU they dominate the step. ``extra_score``
    (B, H, Lq, 1) and ``extra_value`` (B, H, Lq, hd) are one more key per query: the gen stream's
    own token. With dropout the softmax gradient is y*g - p*sum(y*g) (y the dropped
    probabilities), so no mask is kept."""

    @staticmethod
    def forward(ctx, q, k, v, bias, extra_score, extra_value, keep):
        n = k.shape[-2]
        extra = extra_score is not None
        scores = _matmul_with_column(q, k.transpose(-1, -2), extra_score)
        (scores[..., :n] if extra else scores).add_(bias)
        probs = _softmax(scores)
        kept = probs if keep is None else keep.mul_(probs)
        out = torch.matmul(kept[..., :n] if extra else kept, v)
        if extra:
            out.addcmul_(kept[..., n:], extra_value)
        ctx.save_for_backward(q, k, v, probs, None if keep is None else kept, extra_value)
        ctx.extra = extra
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        q, k, v, probs, kept, extra_value = ctx.saved_tensors
        n, extra = k.shape[-2], ctx.extra
        y = probs if kept is None else kept
        d_v = torch.matmul((y[..., :n] if extra else y).transpose(-1, -2), d_out)
        d_y = _matmul_with_column(d_out, v.transpose(-1, -2),
                                  (d_out * extra_value).sum(-1, keepdim=True) if extra else None)
        d_extra_value = y[..., n:] * d_out if extra else None
        if kept is not None:  # softmax backward through the dropout: y*g - p*sum(y*g), in place
            d_s = d_y.mul_(kept)
            d_s.addcmul_(probs, d_s.sum(-1, keepdim=True), value=-1.0)
        elif d_y.device.type == "cpu":
            d_s = torch.ops.aten._softmax_backward_data.out(d_y, probs, -1, probs.dtype, grad_input=d_y)
        else:
            d_s = torch._softmax_backward_data(d_y, probs, -1, probs.dtype)
        d_keys = d_s[..., :n] if extra else d_s
        d_q = torch.matmul(d_keys, k)
        d_k = torch.matmul(d_keys.transpose(-1, -2), q)
        return d_q, d_k, d_v, None, d_s[..., n:] if extra else None, d_extra_value, None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor, dropout_p: float = 0.0,
           training: bool = False, fast_dropout: bool = True, extra_score: torch.Tensor | None = None,
           extra_value: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention, softmax(q k^T / sqrt(hd), -inf where ``masked`` [; extra_score]) @ [v ; extra_value],
    with attention-weight dropout in training. The scale goes on q (hd / Lk the size of the scores);
    the 1/(1-p) of dropout on the (B, H, Lq, hd) result. ``extra_score`` comes scaled and masked."""
    drop = training and dropout_p > 0
    scaled = q * (1.0 / math.sqrt(q.shape[-1]))
    bias = masked_bias(masked, q.dtype)
    shape = q.shape[:-1] + (k.shape[-2] + (extra_score is not None),)
    keep = fast_keep_mask(shape, dropout_p, q.device, fast_dropout, torch.float32) if drop else None
    if drop and keep is None:  # the framework's dropout (CUDA / NPU kernels, or fast_dropout off)
        scores = torch.matmul(scaled, k.transpose(-1, -2)) + bias
        if extra_score is not None:
            scores = torch.cat([scores, extra_score], -1)
        probs = apply_dropout(torch.softmax(scores, -1), dropout_p, True, scale=False, fast=False)
        out = torch.matmul(probs[..., :k.shape[-2]], v)
        if extra_value is not None:
            out = out + probs[..., -1:] * extra_value
    else:
        out = SoftmaxAttention.apply(scaled, k, v, bias, extra_score, extra_value,
                                     None if keep is None else keep.to(q.dtype))
    return out * (1.0 / (1.0 - dropout_p)) if drop else out


def math_attention(q, k, v, masked, dropout_p: float = 0.0, training: bool = False, fast_dropout: bool = True):
    return attend(q, k, v, masked, dropout_p, training, fast_dropout)


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
