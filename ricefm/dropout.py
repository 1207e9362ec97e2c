"""The dropout-mask kinds both backends offer (``model.dropout_masks``).

``fast``: masks from cheap random bits, ``ricefm_npu/dropout.py`` (16-bit draws from torch's
generator, CPU) and ``ricefm_jax/dropout.py`` (a counter hash under the stream's key); the rate
is the configured one and the cost a fraction of the framework's on CPU. ``framework``:
``torch.nn.functional.dropout`` and ``nnx.Dropout`` themselves.
"""

MASKS = ("fast", "framework")
