"""Attention kernels are drop-ins for the math version; NPU paths run against a mocked torch_npu."""

import math
import sys
import types

import numpy as np
import pytest
import torch

from ricefm.errors import RiceFMInputError
from ricefm_npu import devices
from ricefm_npu.attention import math_attention, sdpa_attention
from ricefm_npu.checkpoints import load_published

from conftest import FIXTURES


def random_qkv(B=3, H=4, Lq=7, Lk=9, hd=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, hd, generator=g) for L in (Lq, Lk, Lk))
    masked = torch.rand(B, 1, Lq, Lk, generator=g) < 0.3
    masked[..., 0] = False  # every query keeps a key
    return q, k, v, masked


def test_sdpa_equals_math():
    q, k, v, masked = random_qkv()
    torch.testing.assert_close(sdpa_attention(q, k, v, masked), math_attention(q, k, v, masked), atol=1e-6, rtol=1e-5)


class FakeNPU:
    """Stands in for torch_npu: checks the fusion-attention arguments and computes the reference."""

    def __init__(self, available=True):
        self.calls, self.devices_set = [], []
        self.npu = types.SimpleNamespace(is_available=lambda: available, set_device=self.devices_set.append)

    def npu_fusion_attention(self, q, k, v, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                             scale=1.0, keep_prob=1.0, **kw):
        assert input_layout == "BNSD" and q.dim() == 4 and q.shape[1] == head_num
        assert atten_mask.dtype == torch.bool and atten_mask.shape[-2:] == (q.shape[2], k.shape[2])
        assert atten_mask.shape[1] in (1, head_num)
        assert math.isclose(scale, 1 / math.sqrt(q.shape[-1]))
        self.calls.append({"keep_prob": keep_prob, "mask": atten_mask, "heads": head_num})
        return (math_attention(q, k, v, atten_mask), None, None, None, 0, 0, 0)


@pytest.fixture
def fake_npu(monkeypatch):
    fake = FakeNPU()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    if torch._C._get_privateuse1_backend_name() != "npu":  # what the real torch_npu does on import
        torch.utils.rename_privateuse1_backend("npu")
    return fake


def test_npu_fusion_attention_reproduces_fixture(fake_npu, reference):
    model = load_published(FIXTURES, attention="npu_fusion")[0].eval()
    b = {k[3:]: torch.from_numpy(v) for k, v in reference.items() if k.startswith("in/")}
    with torch.no_grad():
        o = model(b["pcpt_gene_ids"], b["pcpt_values"], b["pcpt_key_padding_mask"], b["mod_types"],
                  b["gen_gene_ids"], b["gen_key_padding_mask"])
    for k in ("pcpt_transformer_out", "gen_transformer_out", "mvc_output", "cell_emb"):
        np.testing.assert_allclose(o[k].numpy(), reference[f"out/{k}"], atol=1e-5, rtol=1e-5)
    assert len(fake_npu.calls) == 4 and {c["keep_prob"] for c in fake_npu.calls} == {1.0}
    gen_mask = fake_npu.calls[1]["mask"]  # layer 0, gen stream: pcpt keys then own key only
    Lp, Lg = b["pcpt_gene_ids"].shape[1], b["gen_gene_ids"].shape[1]
    assert gen_mask.shape == (8, 1, Lg, Lp + Lg)
    own = ~gen_mask[0, 0, :, Lp:]
    assert torch.equal(own, torch.diag(~b["gen_key_padding_mask"][0]))
    model.train()
    model(b["pcpt_gene_ids"], b["pcpt_values"], b["pcpt_key_padding_mask"], b["mod_types"])
    assert fake_npu.calls[-1]["keep_prob"] == pytest.approx(0.8)


def test_auto_device_prefers_npu_and_uses_local_rank(fake_npu, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    d = devices.resolve_device("auto")
    assert (d.type, d.index) == ("npu", 3) and fake_npu.devices_set == [3]
    assert devices.ddp_backend(d) == "hccl" and devices.default_attention(d) == "npu_fusion"


def test_without_cann_auto_falls_back_and_npu_request_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import fails like a missing libhccl.so
    assert devices.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RiceFMInputError, match="importing torch_npu failed.*CANN"):
        devices.resolve_device("npu")
    assert devices.ddp_backend(torch.device("cpu")) == "gloo"


def test_absent_devices_are_clear_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", FakeNPU(available=False))
    with pytest.raises(RiceFMInputError, match="no NPU is visible"):
        devices.resolve_device("npu")
    if not torch.cuda.is_available():
        with pytest.raises(RiceFMInputError, match="no CUDA device"):
            devices.resolve_device("cuda")
    with pytest.raises(RiceFMInputError, match="choose one of"):
        devices.resolve_device("tpu")


@pytest.mark.skipif(not devices.npu_available(), reason="needs Ascend NPU hardware")
def test_fusion_attention_on_real_npu():
    npu = devices.resolve_device("npu")
    q, k, v, masked = (t.to(npu) for t in random_qkv())
    from ricefm_npu.attention import npu_fusion_attention
    got = npu_fusion_attention(q.half(), k.half(), v.half(), masked).float().cpu()
    torch.testing.assert_close(got, math_attention(*(t.cpu() for t in (q, k, v, masked))), atol=2e-2, rtol=2e-2)
