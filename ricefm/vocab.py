"""Gene vocabulary in the published riceFM ``vocab.json`` format.

The file is a JSON object ``{token: id}``. Gene ids come first (0..n_genes-1) and the special
tokens ``<pad>``, ``<cls>``, ``<eoc>`` are appended after them, as the published pretraining
script does. The SHA-256 of the canonical mapping identifies a vocabulary in data manifests and
checkpoints, so shards and models built with different vocabularies are never mixed silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ricefm.atomic import write_json_atomic
from ricefm.errors import RiceFMInputError

PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)

DEFAULT_VOCAB_NAME = "rice_msu7_vocab.json"


class GeneVocab:
    """An immutable token -> id mapping with the three special tokens present."""

    def __init__(self, token_to_id: Mapping[str, int], source: str = "<memory>"):
        self.source = source
        missing = [t for t in SPECIAL_TOKENS if t not in token_to_id]
        if missing:
            raise RiceFMInputError(
                f"{source}: vocabulary lacks the special token(s) {', '.join(missing)}; "
                f"append {', '.join(missing)} after the gene ids (ids {len(token_to_id)}..), "
                "or build one with `ricefm build-data --build-vocab`"
            )
        ids = np.fromiter(token_to_id.values(), dtype=np.int64, count=len(token_to_id))
        if len(np.unique(ids)) != len(ids) or ids.min() < 0 or ids.max() != len(ids) - 1:
            raise RiceFMInputError(
                f"{source}: vocabulary ids must be exactly 0..{len(ids) - 1} with no repeats"
            )
        self._token_to_id = dict(token_to_id)
        self.pad_id = self._token_to_id[PAD_TOKEN]
        self.cls_id = self._token_to_id[CLS_TOKEN]
        self.eoc_id = self._token_to_id[EOC_TOKEN]

    @classmethod
    def from_genes(cls, genes: Iterable[str]) -> "GeneVocab":
        """Genes get ids in the given order; specials are appended after them."""
        mapping: dict[str, int] = {}
        for g in genes:
            if g in SPECIAL_TOKENS:
                raise RiceFMInputError(f"gene id {g!r} collides with a special token")
            mapping.setdefault(g, len(mapping))
        for t in SPECIAL_TOKENS:
            mapping[t] = len(mapping)
        return cls(mapping)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GeneVocab":
        path = Path(path)
        if not path.is_file():
            raise RiceFMInputError(f"{path}: vocabulary file not found; pass --vocab PATH to a vocab.json")
        return cls.from_json(path.read_bytes(), str(path))

    @classmethod
    def from_json(cls, data: bytes, source: str) -> "GeneVocab":
        """A vocabulary from a vocab.json's bytes (``source`` names it in errors)."""
        try:
            mapping = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RiceFMInputError(f"{source}: not a JSON vocabulary ({e}); expected {{gene: id}}") from None
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in mapping.items()
        ):
            raise RiceFMInputError(f"{source}: a vocabulary must be a JSON object mapping gene id (string) -> integer id")
        return cls(mapping, source=source)

    @classmethod
    def default(cls) -> "GeneVocab":
        """The shipped rice vocabulary: all 55,801 MSU7 gene ids, then the specials."""
        ref = resources.files("ricefm.resources").joinpath(DEFAULT_VOCAB_NAME)
        with resources.as_file(ref) as p:
            return cls.load(p)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self._token_to_id)

    def __len__(self) -> int:
        return len(self._token_to_id)

    def __contains__(self, token: object) -> bool:
        return token in self._token_to_id

    def __getitem__(self, token: str) -> int:
        return self._token_to_id[token]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self._token_to_id == other._token_to_id

    @property
    def n_genes(self) -> int:
        return len(self) - len(SPECIAL_TOKENS)

    def as_dict(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def lookup(self, genes: Iterable[str]) -> np.ndarray:
        """Vocabulary id per gene, -1 where the gene is not a (non-special) vocabulary token."""
        get = self._token_to_id.get
        specials = set(SPECIAL_TOKENS)
        return np.array([-1 if g in specials else get(g, -1) for g in genes], dtype=np.int64)

    def sha256(self) -> str:
        canon = json.dumps(sorted(self._token_to_id.items(), key=lambda kv: kv[1]), separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()
