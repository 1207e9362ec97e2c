import json

import pytest

from ricefm.errors import RiceFMInputError
from ricefm.gene_maps import load_gene_map
from ricefm.vocab import GeneVocab

from conftest import FIXTURES


def test_published_vocab_loads_and_round_trips(tmp_path):
    v = GeneVocab.load(FIXTURES / "vocab.json")
    assert (len(v), v.n_genes, v.pad_id, v.cls_id, v.eoc_id) == (123, 120, 120, 121, 122)
    v.save(tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text()) == json.loads((FIXTURES / "vocab.json").read_text())
    assert GeneVocab.load(tmp_path / "v.json").sha256() == v.sha256()


def test_default_vocab_is_all_msu7_genes_then_specials():
    v = GeneVocab.default()
    assert v.n_genes == 55_801 and len(v) == 55_804
    assert (v["LOC_Os01g01010"], v.pad_id, v.cls_id, v.eoc_id) == (0, 55_801, 55_802, 55_803)
    assert v.lookup(["LOC_Os01g01010", "nope", "<pad>"]).tolist() == [0, -1, -1]


def test_from_genes_keeps_order_and_appends_specials():
    v = GeneVocab.from_genes(["b", "a", "b"])
    assert v.as_dict() == {"b": 0, "a": 1, "<pad>": 2, "<cls>": 3, "<eoc>": 4}


def test_vocab_without_specials_is_rejected(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"g1": 0, "g2": 1, "<pad>": 2}))
    with pytest.raises(RiceFMInputError, match=r"bad.json: vocabulary lacks the special token\(s\) <cls>, <eoc>"):
        GeneVocab.load(p)


def test_vocab_with_gaps_or_non_json_is_rejected(tmp_path):
    p = tmp_path / "gap.json"
    p.write_text(json.dumps({"g1": 0, "<pad>": 5, "<cls>": 6, "<eoc>": 7}))
    with pytest.raises(RiceFMInputError, match="ids must be exactly 0..3"):
        GeneVocab.load(p)
    p.write_text("not json")
    with pytest.raises(RiceFMInputError, match="not a JSON vocabulary"):
        GeneVocab.load(p)


def test_rap_to_msu_table():
    m = load_gene_map("rap-to-msu")
    assert m["Os01g0100100"] == "LOC_Os01g01010"
    assert len(m) > 30_000
    with pytest.raises(RiceFMInputError, match="unknown"):
        load_gene_map("zh11-to-msu")
