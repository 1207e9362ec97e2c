"""The published riceFM generative model in Flax NNX, mirroring ``ricefm_npu/model.py`` name for name.

NNX, Flax's current API, is used because its modules are plain Python objects with attributes:
the tree ``encoder.embedding``, ``transformer_encoder.layers[i].self_attn.Wqkv``,
``decoder.fc[0]``, ... is the published state-dict tree itself, so converting a checkpoint is a
table of leaf names and transposes (``converters/``). Parameters are fp32; ``dtype`` sets the
compute precision (fp32 or bf16). Dropout draws from the ``dropout`` RNG stream and is off after
``model.eval()``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ricefm.dropout import MASKS
from ricefm_jax.attention import attend, get_attention, masked_bias
from ricefm_jax.dropout import Dropout


def _layer_norm(d: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # the two-pass variance, as torch computes it (the fast E[x^2]-E[x]^2 form loses digits)
    return nnx.LayerNorm(d, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


class GeneEncoder(nnx.Module):
    """LayerNorm(Embedding(gene)): the gene term of every token, and the MVC query input."""

    def __init__(self, vocab_size: int, d_model: int, eps: float, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Embed(vocab_size, d_model, dtype=dtype, rngs=rngs,
                                   embedding_init=nnx.initializers.uniform(0.2))
        self.enc_norm = _layer_norm(d_model, eps, dtype, rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.enc_norm(self.embedding(ids))


class ValueEncoder(nnx.Module):
    """Continuous value embedding: Linear(1,d) -> ReLU -> Linear(d,d) -> LayerNorm -> Dropout."""

    def __init__(self, d_model: int, dropout: float, max_value: float, eps: float, dtype, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(1, d_model, dtype=dtype, rngs=rngs)
        self.linear2 = nnx.Linear(d_model, d_model, dtype=dtype, rngs=rngs)
        self.norm = _layer_norm(d_model, eps, dtype, rngs)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.max_value = max_value

    def __call__(self, values: jax.Array) -> jax.Array:
        x = jnp.minimum(values, self.max_value)[..., None]
        return self.dropout(self.norm(self.linear2(jax.nn.relu(self.linear1(x)))))


class ModalityEncoder(GeneEncoder):
    """LayerNorm(Embedding(modality)): one vector per cell (0 = scRNA-seq, 1 = spatial)."""


class GenerativeSelfAttention(nnx.Module):
    """One packed q/k/v projection for both streams; ``out_proj`` on the pcpt stream only."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, attention: str, dtype, rngs: nnx.Rngs):
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.Wqkv = nnx.Linear(d_model, 3 * d_model, dtype=dtype, rngs=rngs)
        self.out_proj = nnx.Linear(d_model, d_model, dtype=dtype, rngs=rngs)
        self.attn_dropout = Dropout(dropout, rngs=rngs)
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.attention = attention

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        B, L, _ = x.shape
        qkv = self.Wqkv(x).reshape(B, L, 3, self.n_heads, self.head_dim)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, L, H, hd)

    def _merge(self, x: jax.Array) -> jax.Array:
        B, L = x.shape[:2]
        return x.reshape(B, L, self.n_heads * self.head_dim)

    def __call__(self, pcpt, pcpt_pad, gen=None, gen_pad=None):
        kernel = get_attention(self.attention)
        q_p, k_p, v_p = self._qkv(pcpt)
        pcpt_masked = pcpt_pad[:, None, None, :]
        pcpt_out = self.out_proj(self._merge(kernel(q_p, k_p, v_p, pcpt_masked, self.attn_dropout)))
        if gen is None:
            return pcpt_out, None
        q_g, k_g, v_g = self._qkv(gen)
        if self.attention == "math":
            gen_out = self._gen_attention_math(q_g, k_g, v_g, k_p, v_p, pcpt_masked, gen_pad)
        else:  # fused kernels: keys [pcpt ; gen] with every gen key but a token's own masked
            Lg = gen.shape[1]
            own = jnp.eye(Lg, dtype=bool)
            gen_masked = jnp.concatenate(
                [jnp.broadcast_to(pcpt_masked, (pcpt.shape[0], 1, Lg, pcpt.shape[1])),
                 ~own[None, None] | gen_pad[:, None, None, :]], axis=-1)
            gen_out = kernel(q_g, jnp.concatenate([k_p, k_g], 1), jnp.concatenate([v_p, v_g], 1), gen_masked,
                             self.attn_dropout)
        return pcpt_out, self._merge(gen_out)  # the gen result skips out_proj, as published

    def _gen_attention_math(self, q_g, k_g, v_g, k_p, v_p, pcpt_masked, gen_pad):
        """Exact gen attention without the (Lg x Lg) block that is all masked but its diagonal."""
        scale = 1.0 / math.sqrt(self.head_dim)
        to_self = jnp.einsum("bqhd,bqhd->bhq", q_g, k_g)[..., None] * scale
        to_self = to_self + masked_bias(gen_pad[:, None, :, None], q_g.dtype)
        return attend(q_g, k_p, v_p, pcpt_masked, self.attn_dropout, extra_score=to_self, extra_value=v_g)


class GenerativeLayer(nnx.Module):
    """Post-norm encoder layer applied to both streams with shared weights."""

    def __init__(self, d_model: int, n_heads: int, d_hid: int, dropout: float, eps: float, attention: str, dtype,
                 rngs: nnx.Rngs):
        self.self_attn = GenerativeSelfAttention(d_model, n_heads, dropout, attention, dtype, rngs)
        self.linear1 = nnx.Linear(d_model, d_hid, dtype=dtype, rngs=rngs)
        self.linear2 = nnx.Linear(d_hid, d_model, dtype=dtype, rngs=rngs)
        self.norm1 = _layer_norm(d_model, eps, dtype, rngs)
        self.norm2 = _layer_norm(d_model, eps, dtype, rngs)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.dropout1 = Dropout(dropout, rngs=rngs)
        self.dropout2 = Dropout(dropout, rngs=rngs)

    def _feed_forward(self, x, attn):
        x = self.norm1(x + self.dropout1(attn))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(jax.nn.relu(self.linear1(x))))))

    def __call__(self, pcpt, pcpt_pad, gen=None, gen_pad=None):
        pcpt_attn, gen_attn = self.self_attn(pcpt, pcpt_pad, gen, gen_pad)
        pcpt = self._feed_forward(pcpt, pcpt_attn)
        return pcpt, None if gen is None else self._feed_forward(gen, gen_attn)


class TransformerStack(nnx.Module):
    def __init__(self, n_layers: int, rngs: nnx.Rngs, **layer_kwargs):
        self.layers = nnx.List([GenerativeLayer(**layer_kwargs, rngs=rngs) for _ in range(n_layers)])


class ExprDecoder(nnx.Module):
    """Expression (bin) regression head on every position of both streams."""

    def __init__(self, d_model: int, dtype, rngs: nnx.Rngs):
        # list positions 0, 2, 4 as in the published torch Sequential (1 and 3 are its LeakyReLUs)
        self.fc = nnx.List([nnx.Linear(d_model, d_model, dtype=dtype, rngs=rngs), None,
                            nnx.Linear(d_model, d_model, dtype=dtype, rngs=rngs), None,
                            nnx.Linear(d_model, 1, dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        x = jax.nn.leaky_relu(self.fc[0](x), 0.01)
        x = jax.nn.leaky_relu(self.fc[2](x), 0.01)
        return self.fc[4](x)[..., 0]


class MVCDecoder(nnx.Module):
    """Masked value prediction from the cell embedding: W(sigmoid(gene2query(g))) . cell_emb."""

    def __init__(self, d_model: int, dtype, rngs: nnx.Rngs):
        self.gene2query = nnx.Linear(d_model, d_model, dtype=dtype, rngs=rngs)
        self.W = nnx.Linear(d_model, d_model, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, cell_emb, gene_embs):
        return jnp.einsum("bld,bd->bl", self.W(jax.nn.sigmoid(self.gene2query(gene_embs))), cell_emb)


class ClsDecoder(nnx.Module):
    """Cell-type head on the cell embedding: (Linear -> ReLU -> LayerNorm) x (n_layers - 1) -> Linear."""

    def __init__(self, d_model: int, n_cls: int, n_layers: int, eps: float, dtype, rngs: nnx.Rngs):
        # list positions 0, 2 / 3, 5 ... as in the torch ModuleList (1, 4, ... are its ReLUs)
        self._decoder = nnx.List([m for _ in range(n_layers - 1) for m in (
            nnx.Linear(d_model, d_model, dtype=dtype, rngs=rngs), None, _layer_norm(d_model, eps, dtype, rngs))])
        self.out_layer = nnx.Linear(d_model, n_cls, dtype=dtype, rngs=rngs)

    def __call__(self, cell_emb: jax.Array) -> jax.Array:
        x = cell_emb
        for i in range(0, len(self._decoder), 3):
            x = self._decoder[i + 2](jax.nn.relu(self._decoder[i](x)))
        return self.out_layer(x)


class RiceFM(nnx.Module):
    """riceFM (scGPT-style generator): continuous value input, <cls> cell embedding, MVC head."""

    def __init__(self, vocab_size: int, d_model: int = 256, n_heads: int = 4, n_layers: int = 6, d_hid: int = 256,
                 dropout: float = 0.2, max_value: float = 512.0, layer_norm_eps: float = 1e-5, n_modalities: int = 2,
                 attention: str = "math", dtype=jnp.float32, rngs: nnx.Rngs | None = None, n_cls: int = 1,
                 n_layers_cls: int = 3):
        rngs = rngs or nnx.Rngs(0)
        self.d_model = d_model
        self.encoder = GeneEncoder(vocab_size, d_model, layer_norm_eps, dtype, rngs)
        self.flag_encoder = nnx.Embed(2, d_model, dtype=dtype, rngs=rngs)
        self.value_encoder = ValueEncoder(d_model, dropout, max_value, layer_norm_eps, dtype, rngs)
        self.mod_encoder = ModalityEncoder(n_modalities, d_model, layer_norm_eps, dtype, rngs)
        self.transformer_encoder = TransformerStack(n_layers, rngs, d_model=d_model, n_heads=n_heads, d_hid=d_hid,
                                                    dropout=dropout, eps=layer_norm_eps, attention=attention,
                                                    dtype=dtype)
        self.decoder = ExprDecoder(d_model, dtype, rngs)
        self.mvc_decoder = MVCDecoder(d_model, dtype, rngs)
        if n_cls > 1:  # as published: n_cls = 1 means no classification head
            self.cls_decoder = ClsDecoder(d_model, n_cls, n_layers_cls, layer_norm_eps, dtype, rngs)

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int, attention: str | None = None,
                    dtype=jnp.float32, seed: int = 0, n_cls: int = 1) -> "RiceFM":
        attention = attention or model.attention
        return cls(vocab_size=vocab_size, d_model=model.d_model, n_heads=model.n_heads, n_layers=model.n_layers,
                   d_hid=model.d_hid, dropout=model.dropout, max_value=model.max_value,
                   layer_norm_eps=model.layer_norm_eps, n_modalities=model.n_modalities,
                   attention="math" if attention == "auto" else attention, dtype=dtype, rngs=nnx.Rngs(seed),
                   n_cls=n_cls, n_layers_cls=int(model.get("n_layers_cls", 3))
                   ).set_dropout_masks(model.get("dropout_masks", "fast"))

    def set_attention(self, name: str) -> None:
        get_attention(name)
        for layer in self.transformer_encoder.layers:
            layer.self_attn.attention = name

    def set_dropout_masks(self, kind: str) -> "RiceFM":
        """``fast`` (``ricefm_jax.dropout``'s counter-hash masks) or ``framework`` (``nnx.Dropout``'s)."""
        if kind not in MASKS:
            raise ValueError(f"dropout_masks {kind!r} is not one of {MASKS}")
        for _, m in nnx.iter_graph(self):
            if isinstance(m, Dropout):
                m.fast = kind == "fast"
        return self

    def __call__(self, pcpt_gene_ids, pcpt_values, pcpt_key_padding_mask, mod_types, gen_gene_ids=None,
                 gen_key_padding_mask=None, input_cell_emb=None, do_mvc: bool = True,
                 return_layers: bool = False) -> dict[str, Any]:
        """Generative forward (gen tokens given) or pcpt-only forward (embeddings, inference)."""
        mod = self.mod_encoder(mod_types)[:, None, :]
        pcpt_genes = self.encoder(pcpt_gene_ids)
        pcpt = pcpt_genes + self.value_encoder(pcpt_values) + mod
        if input_cell_emb is not None:
            pcpt = pcpt.at[:, 0].set(input_cell_emb.astype(pcpt.dtype))
        out: dict[str, Any] = {}
        gen = gen_genes = None
        if gen_gene_ids is not None:
            gen_genes = self.encoder(gen_gene_ids)
            gen = gen_genes + self.flag_encoder.embedding[1].astype(gen_genes.dtype) + mod
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
            genes = pcpt_genes if gen_genes is None else jnp.concatenate([pcpt_genes, gen_genes], axis=1)
            out["mvc_output"] = self.mvc_decoder(cell_emb, genes)
        return out
