"""The backend registry: the core knows each backend by name only (DESIGN.md section 1).

A backend is a module, ``ricefm_npu.backend`` or ``ricefm_jax.backend``, imported by name when first
asked for, so the core never has an import statement of a backend and a missing extra becomes one
clear line here instead of a traceback wherever a backend happens to be needed.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ricefm.errors import RiceFMInputError

BACKENDS = {"torch": "ricefm_npu.backend", "jax": "ricefm_jax.backend"}
EXTRAS = {"torch": "torch", "jax": "jax"}  # pip extra that installs each backend's libraries
OWN_PACKAGES = ("ricefm", "ricefm_npu", "ricefm_jax", "converters", "ricefm_configs")


class Embedder(Protocol):
    """Embeddings of a pcpt batch (``ricefm.batching`` keys) with a checkpoint's model."""

    vocab: Any  # ricefm.vocab.GeneVocab
    model_config: Any
    description: str

    def embed(self, batch: dict[str, np.ndarray]) -> np.ndarray: ...


class Finetuner(Protocol):
    """Cell-type fine-tuning of a checkpoint's encoder plus a head (``ricefm.evaluate.annotation``)."""

    vocab: Any
    model_config: Any
    description: str

    def start(self, head: dict[str, np.ndarray], n_classes: int, cfg: Any, steps_per_epoch: int, seed: int) -> None:
        """A fresh model: the checkpoint's weights plus ``head``, a new optimizer, dropout seeded."""

    def train_step(self, batch: dict[str, np.ndarray], labels: np.ndarray, weights: np.ndarray) -> float: ...

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray: ...

    def snapshot(self) -> Any: ...

    def restore(self, snapshot: Any) -> None: ...

    def state_dict(self) -> dict[str, np.ndarray]:
        """The fine-tuned weights, head included, torch-named and torch-laid-out (for a checkpoint)."""


class Classifier(Protocol):
    """A fine-tuned checkpoint's class logits and cell embeddings of a pcpt batch (``ricefm annotate``)."""

    vocab: Any
    model_config: Any
    finetune: dict  # the checkpoint's record: class_names in head order, settings, validation metrics
    description: str

    def classify(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]: ...


class Backend(Protocol):
    """What a backend module (``<package>/backend.py``) offers; both mirror each other."""

    NAME: str
    ATTENTION_KERNELS: tuple[str, ...]

    def load_embedder(self, checkpoint: str | Path, device: str = "auto") -> Embedder: ...

    def load_finetuner(self, checkpoint: str | Path, device: str = "auto") -> Finetuner: ...

    def load_classifier(self, checkpoint: str | Path, device: str = "auto") -> Classifier: ...

    def train(self, cfg: Any, workdir: str | Path, device: str = "auto", resume: bool = False,
              progress: bool = True) -> dict[str, Any]: ...

    def describe_device(self, device: str = "auto") -> str: ...

    def doctor(self, device: str = "auto") -> list[tuple[str, str]]: ...


def get_backend(name: str) -> Backend:
    """The backend module called ``name``; a missing extra is one line naming what to install."""
    if name not in BACKENDS:
        raise RiceFMInputError(f"backend {name!r}: choose one of {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as e:
        if (getattr(e, "name", None) or "").split(".")[0] in OWN_PACKAGES:
            raise  # a bug in this project, not a missing extra
        raise RiceFMInputError(f"the {name} backend needs the {EXTRAS[name]} extra "
                               f"(pip install 'ricefm[{EXTRAS[name]}]'): {e}") from None

