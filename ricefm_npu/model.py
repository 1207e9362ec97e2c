"""The published riceFM generative model as a torch module tree.

Attribute names equal the published checkpoint's state-dict keys (``encoder.embedding.weight``,
``transformer_encoder.layers.0.self_attn.Wqkv.weight``, ...), so a published ``best_model.pt``
loads strictly and converting to Flax is a table of transposes. Two token streams run through
shared weights: the perceptual (pcpt) stream, ``<cls>`` + genes with their values, and the
generative (gen) stream, genes whose values are to be predicted. A gen token attends to every
non-padded pcpt token and to itself only; the pcpt stream never sees gen tokens.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from ricefm.dropout import MASKS
from ricefm_npu.attention import attend, get_attention
from ricefm_npu.dropout import Dropout


class GeneEncoder(nn.Module):
    """LayerNorm(Embedding(gene)): the gene term of every token, and the MVC query input."""

    def __init__(self, vocab_size: int, d_model: int, eps: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.enc_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, gene_ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(gene_ids))


class ValueEncoder(nn.Module):
    """Continuous value embedding: Linear(1,d) -> ReLU -> Linear(d,d) -> LayerNorm -> Dropout."""

    def __init__(self, d_model: int, dropout: float, max_value: float, eps: float):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = Dropout(dropout)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values, max=self.max_value).unsqueeze(-1)
        x = self.linear2(F.relu(self.linear1(x)))
        return self.dropout(self.norm(x))


class ModalityEncoder(GeneEncoder):
    """LayerNorm(Embedding(modality)): one vector per cell (0 = scRNA-seq, 1 = spatial)."""


class GenerativeSelfAttention(nn.Module):
    """One packed q/k/v projection for both streams; ``out_proj`` on the pcpt stream only."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, attention: str):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.Wqkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.n_heads, self.head_dim, self.dropout = n_heads, d_model // n_heads, dropout
        self.attention, self.fast_dropout = attention, True

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        qkv = self.Wqkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (B, H, L, hd)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        B, H, L, hd = x.shape
        return x.transpose(1, 2).reshape(B, L, H * hd)

    def forward(self, pcpt: torch.Tensor, pcpt_pad: torch.Tensor, gen: torch.Tensor | None = None,
                gen_pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        kernel = get_attention(self.attention)
        p = self.dropout if self.training else 0.0
        q_p, k_p, v_p = self._qkv(pcpt)
        pcpt_masked = pcpt_pad[:, None, None, :]
        pcpt_out = self.out_proj(self._merge(kernel(q_p, k_p, v_p, pcpt_masked, p, self.training, self.fast_dropout)))
        if gen is None:
            return pcpt_out, None
        q_g, k_g, v_g = self._qkv(gen)
        if self.attention == "math":
            gen_out = self._gen_attention_math(q_g, k_g, v_g, k_p, v_p, pcpt_masked, gen_pad, p)
        else:  # fused kernels: keys [pcpt ; gen] with every gen key but a token's own masked
            Lg = gen.shape[1]
            own = torch.eye(Lg, dtype=torch.bool, device=gen.device)
            gen_masked = torch.cat([pcpt_masked.expand(-1, 1, Lg, -1), ~own | gen_pad[:, None, None, :]], dim=-1)
            gen_out = kernel(q_g, torch.cat([k_p, k_g], 2), torch.cat([v_p, v_g], 2), gen_masked, p, self.training,
                             self.fast_dropout)
        return pcpt_out, self._merge(gen_out)  # the gen result skips out_proj, as published

    def _gen_attention_math(self, q_g, k_g, v_g, k_p, v_p, pcpt_masked, gen_pad, p):
        """Exact gen attention without the (Lg x Lg) block that is all masked but its diagonal."""
        scale = 1.0 / math.sqrt(self.head_dim)
        to_self = ((q_g * k_g).sum(-1, keepdim=True) * scale).masked_fill(gen_pad[:, None, :, None], float("-inf"))
        return attend(q_g, k_p, v_p, pcpt_masked, p, p > 0, self.fast_dropout, extra_score=to_self, extra_value=v_g)


class GenerativeLayer(nn.Module):
    """Post-norm encoder layer applied to both streams with shared weights."""

    def __init__(self, d_model: int, n_heads: int, d_hid: int, dropout: float, eps: float, attention: str):
        super().__init__()
        self.self_attn = GenerativeSelfAttention(d_model, n_heads, dropout, attention)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def _feed_forward(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(attn))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))

    def forward(self, pcpt, pcpt_pad, gen=None, gen_pad=None):
        pcpt_attn, gen_attn = self.self_attn(pcpt, pcpt_pad, gen, gen_pad)
        pcpt = self._feed_forward(pcpt, pcpt_attn)
        return pcpt, None if gen is None else self._feed_forward(gen, gen_attn)


class TransformerStack(nn.Module):
    def __init__(self, n_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList([GenerativeLayer(**layer_kwargs) for _ in range(n_layers)])


class ExprDecoder(nn.Module):
    """Expression (bin) regression head on every position of both streams."""

    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(d_model, d_model), nn.LeakyReLU(0.01), nn.Linear(d_model, d_model),
                                nn.LeakyReLU(0.01), nn.Linear(d_model, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(-1)


class MVCDecoder(nn.Module):
    """Masked value prediction from the cell embedding: W(sigmoid(gene2query(g))) . cell_emb."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.W = nn.Linear(d_model, d_model, bias=False)

    def forward(self, cell_emb: torch.Tensor, gene_embs: torch.Tensor) -> torch.Tensor:
        query = torch.sigmoid(self.gene2query(gene_embs))
        return torch.bmm(self.W(query), cell_emb.unsqueeze(2)).squeeze(2)


class ClsDecoder(nn.Module):
    """Cell-type head on the cell embedding: (Linear -> ReLU -> LayerNorm) x (n_layers - 1) -> Linear.

    Names follow scGPT-style fine-tuned state dicts (``cls_decoder._decoder.0.weight``, ...)."""

    def __init__(self, d_model: int, n_cls: int, n_layers: int = 3, eps: float = 1e-5):
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(n_layers - 1):
            self._decoder.extend([nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model, eps=eps)])
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, cell_emb: torch.Tensor) -> torch.Tensor:
        x = cell_emb
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


def _concrete(attention: str) -> str:
    """'auto' without a device at hand means SDPA; training/embedding pick per device first."""
    return "sdpa" if attention == "auto" else attention


class RiceFM(nn.Module):
    """riceFM (scGPT-style generator): continuous value input, <cls> cell embedding, MVC head."""

    def __init__(self, vocab_size: int, d_model: int = 256, n_heads: int = 4, n_layers: int = 6, d_hid: int = 256,
                 dropout: float = 0.2, max_value: float = 512.0, layer_norm_eps: float = 1e-5,
                 n_modalities: int = 2, attention: str = "math", n_cls: int = 1, n_layers_cls: int = 3):
        super().__init__()
        self.d_model = d_model
        self.encoder = GeneEncoder(vocab_size, d_model, layer_norm_eps)
        self.flag_encoder = nn.Embedding(2, d_model)
        self.value_encoder = ValueEncoder(d_model, dropout, max_value, layer_norm_eps)
        self.mod_encoder = ModalityEncoder(n_modalities, d_model, layer_norm_eps)
        self.transformer_encoder = TransformerStack(n_layers, d_model=d_model, n_heads=n_heads, d_hid=d_hid,
                                                    dropout=dropout, eps=layer_norm_eps, attention=attention)
        self.decoder = ExprDecoder(d_model)
        self.mvc_decoder = MVCDecoder(d_model)
        if n_cls > 1:  # as published: n_cls = 1 means no classification head
            self.cls_decoder = ClsDecoder(d_model, n_cls, n_layers_cls, layer_norm_eps)
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int, attention: str | None = None,
                    n_cls: int = 1) -> "RiceFM":
        return cls(vocab_size=vocab_size, d_model=model.d_model, n_heads=model.n_heads, n_layers=model.n_layers,
                   d_hid=model.d_hid, dropout=model.dropout, max_value=model.max_value,
                   layer_norm_eps=model.layer_norm_eps, n_modalities=model.n_modalities,
                   attention=_concrete(attention or model.attention), n_cls=n_cls,
                   n_layers_cls=int(model.get("n_layers_cls", 3))).set_dropout_masks(model.get("dropout_masks", "fast"))

    def set_attention(self, name: str) -> None:
        get_attention(name)
        for layer in self.transformer_encoder.layers:
            layer.self_attn.attention = name

    def set_dropout_masks(self, kind: str) -> "RiceFM":
        """``fast`` (``ricefm_npu.dropout``'s cheap CPU masks) or ``framework`` (``F.dropout``)."""
        if kind not in MASKS:
            raise ValueError(f"dropout_masks {kind!r} is not one of {MASKS}")
        for m in self.modules():
            if isinstance(m, Dropout):
                m.fast = kind == "fast"
            elif isinstance(m, GenerativeSelfAttention):
                m.fast_dropout = kind == "fast"
        return self

    def forward(self, pcpt_gene_ids: torch.Tensor, pcpt_values: torch.Tensor, pcpt_key_padding_mask: torch.Tensor,
                mod_types: torch.Tensor, gen_gene_ids: torch.Tensor | None = None,
                gen_key_padding_mask: torch.Tensor | None = None, input_cell_emb: torch.Tensor | None = None,
                do_mvc: bool = True, return_layers: bool = False) -> dict[str, Any]:
        """Generative forward (gen tokens given) or pcpt-only forward (embeddings, inference)."""
        mod = self.mod_encoder(mod_types).unsqueeze(1)
        pcpt_genes = self.encoder(pcpt_gene_ids)
        pcpt = pcpt_genes + self.value_encoder(pcpt_values) + mod
        if input_cell_emb is not None:
            pcpt = torch.cat([input_cell_emb.unsqueeze(1).to(pcpt.dtype), pcpt[:, 1:]], dim=1)
        out: dict[str, Any] = {}
        gen = gen_genes = None
        if gen_gene_ids is not None:
            gen_genes = self.encoder(gen_gene_ids)
            gen = gen_genes + self.flag_encoder.weight[1] + mod
        if return_layers:
            out.update(pcpt_input_embs=pcpt, gen_input_embs=gen, layer_outputs=[])
        for layer in self.transformer_encoder.layers:
            pcpt, gen = layer(pcpt, pcpt_key_padding_mask, gen, gen_key_padding_mask)
            if return_layers:
                out["layer_outputs"].append((pcpt, gen))
        cell_emb = pcpt[:, 0]
        out.update(pcpt_transformer_out=pcpt, cell_emb=cell_emb, pcpt_preds=self.decoder(pcpt))
        if hasattr(self, "cls_decoder"):
            out["cls_output"] = self.cls_decoder(cell_emb)
        if gen is not None:
            out.update(gen_transformer_out=gen, gen_preds=self.decoder(gen))
        if do_mvc:
            genes = pcpt_genes if gen_genes is None else torch.cat([pcpt_genes, gen_genes], dim=1)
            out["mvc_output"] = self.mvc_decoder(cell_emb, genes)
        return out
