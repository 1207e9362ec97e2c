"""The torch math attention's fused kernel (ricefm_npu/attention.py ``SoftmaxAttention``): its hand-written
backward is exact. torch only, so the torch 2.1 lane runs it."""

import pytest
import torch

from ricefm_npu import attention as torch_attention


@pytest.mark.parametrize("own_token", [False, True], ids=["pcpt", "gen"])
@pytest.mark.parametrize("drop", [False, True], ids=["no_dropout", "dropout"])
def test_torch_softmax_attention_gradients_are_exact(own_token, drop):
    """The hand-written backward of ``SoftmaxAttention`` (buffers reused, the dropout gradient as
    y*g - p*sum(y*g)) against finite differences in float64 (``gradcheck``'s own tolerances), and
    its outputs and gradients against autograd's ops on the same mask."""
    from torch.autograd import gradcheck

    g = torch.Generator().manual_seed(0)
    B, H, Lq, Lk, hd = 2, 3, 5, 7, 4
    q, k, v = (torch.randn(B, H, L, hd, generator=g, dtype=torch.float64, requires_grad=True) for L in (Lq, Lk, Lk))
    masked = torch.zeros(B, 1, 1, Lk, dtype=torch.bool)
    masked[0, ..., -2:] = True
    bias = torch_attention.masked_bias(masked, torch.float64)
    extra = [torch.randn(B, H, Lq, n, generator=g, dtype=torch.float64, requires_grad=True) if own_token else None
             for n in (1, hd)]
    keep = (torch.rand(B, H, Lq, Lk + own_token, generator=g) < 0.7).double() if drop else None

    def fused(q, k, v, es, ev):  # the call consumes its mask
        return torch_attention.SoftmaxAttention.apply(q, k, v, bias, es, ev, None if keep is None else keep.clone())

    def plain(q, k, v, es, ev):
        s = q @ k.transpose(-1, -2) + bias
        p = torch.softmax(s if es is None else torch.cat([s, es], -1), -1)
        p = p if keep is None else p * keep
        return p[..., :Lk] @ v + (0 if ev is None else p[..., Lk:] * ev)

    inputs = (q, k, v, *extra)
    assert gradcheck(fused, inputs)
    leaves = [t for t in inputs if t is not None]
    d_out = torch.randn(B, H, Lq, hd, generator=g, dtype=torch.float64)
    # DESIGN.md's output and gradient tolerances (here float64, so far inside them)
    torch.testing.assert_close(fused(*inputs), plain(*inputs), rtol=1e-5, atol=1e-5)
    got, want = (torch.autograd.grad(f(*inputs), leaves, d_out) for f in (fused, plain))
    for a, b in zip(got, want):
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())
