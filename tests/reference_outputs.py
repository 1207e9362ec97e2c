"""The published model's forward outputs in reference.npz, checked the same way for either backend."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

FIRST_PASS = ("pcpt_input_embs", "gen_input_embs", "pcpt_transformer_out", "gen_transformer_out", "pcpt_preds",
              "gen_preds", "mvc_output", "cell_emb")
SECOND_PASS = ("pcpt_transformer_out", "gen_transformer_out", "pcpt_preds", "gen_preds", "cell_emb")


def assert_generative_passes(first: dict[str, Any], second: dict[str, Any], reference, to_numpy: Callable,
                             atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """``first``: a generative forward with return_layers; ``second``: the pass fed its cell embedding."""
    def close(got, key):
        np.testing.assert_allclose(to_numpy(got), reference[key], atol=atol, rtol=rtol, err_msg=key)

    for k in FIRST_PASS:
        close(first[k], f"out/{k}")
    for i, (pcpt, gen) in enumerate(first["layer_outputs"]):
        close(pcpt, f"out/layer{i}_pcpt_out")
        close(gen, f"out/layer{i}_gen_out")
    for k in SECOND_PASS:
        close(second[k], f"out2/{k}")
