"""Attention kernels are drop-ins for the math version; NPU paths run against a mocked torch_npu."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ricefm.errors import RiceFMInputError
from ricefm_npu import devices
from ricefm_npu.attention import math_attention, sdpa_attention
from ricefm_npu.checkpoints import load_published

from conftest import FIXTURES
from fake_torch_npu import FakeNPU


def random_qkv(B=3, H=4, Lq=7, Lk=9, hd=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, hd, generator=g) for L in (Lq, Lk, Lk))
    masked = torch.rand(B, 1, Lq, Lk, generator=g) < 0.3
    masked[..., 0] = False  # every query keeps a key
    return q, k, v, masked


def test_sdpa_equals_math():
    q, k, v, masked = random_qkv()
    torch.testing.assert_close(sdpa_attention(q, k, v, masked), math_attention(q, k, v, masked), atol=1e-6, rtol=1e-5)


@pytest.fixture
def fake_npu(monkeypatch):
    fake = FakeNPU()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
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


def test_auto_device_prefers_npu_and_uses_local_rank():
    # torch.device("npu") needs the backend rename that importing torch_npu performs; it is
    # process-global and irreversible, so this runs in a fresh interpreter
    code = ("import sys, torch; from fake_torch_npu import FakeNPU; fake = FakeNPU(); sys.modules['torch_npu'] = fake; "
            "torch.utils.rename_privateuse1_backend('npu'); from ricefm_npu import devices; "
            "d = devices.resolve_device('auto'); print(d.type, d.index, fake.devices_set, devices.ddp_backend(d), "
            "devices.default_attention(d))")
    env = {**os.environ, "LOCAL_RANK": "3", "PYTHONPATH": str(Path(__file__).parent)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["npu", "3", "[3]", "hccl", "npu_fusion"]


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
    with pytest.raises(RiceFMInputError, match="choose one of auto, cpu, cuda, npu, tpu"):
        devices.resolve_device("gpu")
    with pytest.raises(RiceFMInputError, match="the torch backend runs on npu, cuda or cpu; use --backend jax"):
        devices.resolve_device("tpu")  # a choice of the shared --device flag that only JAX serves


@pytest.mark.skipif(not devices.npu_available(), reason="needs Ascend NPU hardware")
def test_fusion_attention_on_real_npu():
    npu = devices.resolve_device("npu")
    q, k, v, masked = (t.to(npu) for t in random_qkv())
    from ricefm_npu.attention import npu_fusion_attention
    got = npu_fusion_attention(q.half(), k.half(), v.half(), masked).float().cpu()
    torch.testing.assert_close(got, math_attention(*(t.cpu() for t in (q, k, v, masked))), atol=2e-2, rtol=2e-2)
