"""A stand-in for torch_npu: checks fusion-attention arguments and computes the reference."""

import math
import types

import torch

from ricefm_npu.attention import math_attention


class FakeGradScaler:
    """torch_npu.npu.amp.GradScaler's constructor, recorded."""

    def __init__(self, enabled=True):
        self.enabled = enabled


class FakeNPU:
    def __init__(self, available=True, count=8):
        self.calls, self.devices_set = [], []
        self.npu = types.SimpleNamespace(is_available=lambda: available, set_device=self.devices_set.append,
                                         device_count=lambda: count if available else 0,
                                         amp=types.SimpleNamespace(GradScaler=FakeGradScaler))

    def npu_fusion_attention(self, q, k, v, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                             scale=1.0, keep_prob=1.0, **kw):
        assert input_layout == "BNSD" and q.dim() == 4 and q.shape[1] == head_num
        assert atten_mask.dtype == torch.bool and atten_mask.shape[-2:] == (q.shape[2], k.shape[2])
        assert atten_mask.shape[1] in (1, head_num)
        assert math.isclose(scale, 1 / math.sqrt(q.shape[-1]))
        self.calls.append({"keep_prob": keep_prob, "mask": atten_mask, "heads": head_num})
        return (math_attention(q, k, v, atten_mask), None, None, None, 0, 0, 0)
