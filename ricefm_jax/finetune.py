"""Cell-type annotation fine-tuning with the Flax model (the backend side of
``ricefm.evaluate.annotation``), mirroring ``ricefm_npu/finetune.py``: the checkpoint's encoder
plus a classification head on the cell embedding, a jit-compiled step with optax (clipping, Adam,
per-epoch decay), fp32, the encoder optionally frozen (gradients only for ``cls_decoder``). The
weights, optimizer state and batches live on the ``device`` chosen as for torch (``ricefm_jax.devices``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from converters.formats import load_checkpoint
from ricefm.batching import PCPT_INPUTS
from ricefm.evaluate.annotation import lr_factor
from ricefm_jax import devices
from ricefm_jax.backend import device_description
from ricefm_jax.model import RiceFM
from ricefm_jax.params import load_state_dict, state_dict


class JaxFinetuner:
    def __init__(self, checkpoint: str | Path, device: str = "auto", attention: str = "math"):
        self.device = devices.resolve_devices(device)[0]
        ckpt = load_checkpoint(checkpoint)
        self.state, self.model_config, self.vocab, self.source = ckpt.state, ckpt.model, ckpt.vocab, str(checkpoint)
        self.attention = attention
        self.description = device_description(self.device)
        self._compiled: dict[tuple, tuple] = {}

    def start(self, head: dict[str, np.ndarray], n_classes: int, cfg: ml_collections.ConfigDict,
              steps_per_epoch: int, seed: int) -> None:
        model_cfg = copy.deepcopy(self.model_config)
        model_cfg.dropout = float(cfg.dropout)
        model = RiceFM.from_config(model_cfg, len(self.vocab), attention=self.attention, seed=seed, n_cls=n_classes)
        load_state_dict(model, {**self.state, **head}, self.source)
        freeze = bool(cfg.freeze_encoder)
        graphdef, *parts = nnx.split(model, _trainable(freeze), nnx.Param, ...)
        self._graphdef = graphdef
        self.params, self.fixed, self.rest = jax.device_put(parts, self.device)
        settings = (graphdef, freeze, float(cfg.lr), float(cfg.lr_decay_per_epoch), float(cfg.grad_clip_norm),
                    steps_per_epoch)
        if settings not in self._compiled:  # seeds share one compilation
            self._compiled[settings] = _compile(*settings)
        self._train_step, self._logits, tx = self._compiled[settings]
        self.opt_state, self.step = tx.init(self.params), 0
        self.base_key = jax.device_put(jax.random.key(seed), self.device)

    def train_step(self, batch: dict[str, np.ndarray], labels: np.ndarray, weights: np.ndarray) -> float:
        inputs, labels, weights = jax.device_put(({k: batch[k] for k in PCPT_INPUTS}, labels.astype(np.int32), weights),
                                                 self.device)
        self.params, self.opt_state, loss = self._train_step(self.params, self.opt_state, self.fixed, self.rest,
                                                             inputs, labels, weights, self.base_key,
                                                             self.step)
        self.step += 1
        return float(loss)

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = jax.device_put({k: batch[k] for k in PCPT_INPUTS}, self.device)
        return np.asarray(self._logits(self.params, self.fixed, self.rest, inputs), np.float32)

    def snapshot(self) -> Any:
        return self.params  # immutable arrays: holding the reference is a snapshot

    def restore(self, snapshot: Any) -> None:
        self.params = snapshot

    def state_dict(self) -> dict[str, np.ndarray]:
        return state_dict(nnx.merge(self._graphdef, self.params, self.fixed, self.rest))


def _trainable(freeze: bool):
    return nnx.All(nnx.Param, nnx.PathContains("cls_decoder")) if freeze else nnx.Param


def _compile(graphdef, freeze: bool, lr: float, decay: float, clip: float, steps_per_epoch: int):
    """(train step, logits, optimizer) for one model structure and optimizer setting."""
    tx = optax.chain(optax.clip_by_global_norm(clip),
                     optax.adam(lambda count: lr * lr_factor(count, steps_per_epoch, decay)))

    def cls_output(m, batch):
        return m(*(batch[k] for k in PCPT_INPUTS), do_mvc=False)["cls_output"]

    @jax.jit
    def train_step(params, opt_state, fixed, rest, batch, labels, weights, base_key, step):
        m = nnx.merge(graphdef, params, fixed, rest)
        if freeze:  # a frozen encoder also keeps its dropout off, as in torch
            m.eval()
        else:
            m.train()
            nnx.reseed(m, dropout=jax.random.fold_in(base_key, step))

        def loss_fn(mod):
            logp = jax.nn.log_softmax(cls_output(mod, batch))
            nll = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
            w = weights[labels]
            return (w * nll).sum() / w.sum()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, _trainable(freeze)))(m)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def logits(params, fixed, rest, batch):
        m = nnx.merge(graphdef, params, fixed, rest)
        m.eval()
        return cls_output(m, batch)

    return train_step, logits, tx
