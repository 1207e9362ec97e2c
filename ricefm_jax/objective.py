"""The riceFM pretraining objective in JAX, mirroring ``ricefm_npu/objective.py``.

total = MSE(gen predictions) + MSE(MVC predictions on the gen part)
        + MSE(gen predictions of a second pass whose <cls> input is the detached cell embedding)
over non-padded gen positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ricefm.batching import GENERATIVE_INPUTS


def masked_mse(pred, target, mask, denominator=None):
    """Sum of squared errors over ``mask`` / mask count (inputs masked first, as published)."""
    m = mask.astype(jnp.float32)
    pred = pred.astype(jnp.float32)
    return jnp.sum((pred * m - target * m) ** 2) / (jnp.sum(m) if denominator is None else denominator)


def pretraining_loss(model, batch: dict, cell_emb_pass: bool = True, denominator=None):
    """Loss of one generative batch and its components (for logging)."""
    inputs = {k: batch[k] for k in GENERATIVE_INPUTS}
    target = batch["gen_target_values"]
    mask = ~batch["gen_key_padding_mask"]
    out = model(**inputs, do_mvc=True)
    pcpt_len = batch["pcpt_gene_ids"].shape[1]
    parts = {"mse": masked_mse(out["gen_preds"], target, mask, denominator),
             "mvc": masked_mse(out["mvc_output"][:, pcpt_len:], target, mask, denominator)}
    if cell_emb_pass:
        out2 = model(**inputs, do_mvc=False, input_cell_emb=jax.lax.stop_gradient(out["cell_emb"]))
        parts["gen"] = masked_mse(out2["gen_preds"], target, mask, denominator)
    total = sum(parts.values())
    return total, {"total": total, **parts}
