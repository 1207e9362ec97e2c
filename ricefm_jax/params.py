"""Moving weights in and out of the Flax model as a torch-named state dict of NumPy arrays."""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.names import check_keys, to_flax_layout, to_torch_layout, torch_key


def state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Torch-named, torch-layout copy of every parameter."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {torch_key(path): to_torch_layout(path, np.asarray(var[...])) for path, var in flat}


def load_state_dict(model: nnx.Module, state: Mapping[str, np.ndarray], source: str) -> None:
    """Strictly load a torch-named state dict (one error lists every problem)."""
    params = nnx.state(model, nnx.Param)
    flat = list(nnx.to_flat_state(params))
    expected = {torch_key(p): to_torch_layout(p, np.zeros(v[...].shape, np.uint8)).shape for p, v in flat}
    check_keys(expected, state, source)
    for path, var in flat:
        var[...] = jnp.asarray(to_flax_layout(path, np.asarray(state[torch_key(path)], dtype=np.float32)))
    nnx.update(model, params)
