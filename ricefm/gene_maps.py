"""Gene-ID translation tables, so data in one rice ID space can join a vocabulary in another.

Shipped: ``rap-to-msu`` (RAP-DB ``Os01g0100100`` -> MSU7 ``LOC_Os01g01010``), from the PyRice
(MIT) correspondence tables. A RAP id with several MSU loci maps to the first one listed.
"""

from __future__ import annotations

import csv
from importlib import resources

from ricefm.errors import RiceFMInputError

_TABLES = {"rap-to-msu": ("rice_rap_to_msu.tsv", "rap_id", "msu_id")}

GENE_MAP_NAMES = tuple(_TABLES)


def load_gene_map(name: str) -> dict[str, str]:
    if name not in _TABLES:
        raise RiceFMInputError(f"--gene-map {name!r} is unknown; choose one of {', '.join(_TABLES)}")
    fname, src_col, dst_col = _TABLES[name]
    mapping: dict[str, str] = {}
    with resources.files("ricefm.resources").joinpath(fname).open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            mapping.setdefault(row[src_col], row[dst_col])
    return mapping
