"""Bad input: one clear line naming the file and the field, exit code 2, and no output at all."""

import json

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from ricefm_cli.cli import main as cli
from ricefm.shards.build import BuildOptions, build_dataset

from conftest import gene_names, random_counts, write_h5ad


def run_cli(tmp_path, capsys, *args):
    rc = cli(["build-data", *map(str, args), "--output", str(tmp_path / "ds"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("ricefm build-data: error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()
    return err


@pytest.fixture
def good(tmp_path):
    return write_h5ad(tmp_path / "good.h5ad", random_counts(50, 80, seed=5), gene_names(80),
                      obs={"celltype": ["a", "b"] * 25})


def test_missing_file(tmp_path, capsys, vocab_path):
    err = run_cli(tmp_path, capsys, tmp_path / "nope.h5ad", "--vocab", vocab_path)
    assert "nope.h5ad: input file not found" in err


def test_not_an_h5ad(tmp_path, capsys, vocab_path):
    (tmp_path / "x.h5ad").write_text("cell,gene\n")
    assert "x.h5ad: not an h5ad file (not HDF5)" in run_cli(tmp_path, capsys, tmp_path / "x.h5ad", "--vocab", vocab_path)
    with h5py.File(tmp_path / "y.h5ad", "w") as f:
        f["data"] = np.zeros(3)
    assert "y.h5ad: not an h5ad file (no obs/var/X groups)" in run_cli(tmp_path, capsys, tmp_path / "y.h5ad", "--vocab", vocab_path)


@pytest.mark.parametrize("bad,word", [(-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite")])
def test_invalid_values_leave_no_output(tmp_path, capsys, vocab_path, bad, word):
    X = random_counts(3000, 80, density=0.3, seed=6).toarray()
    X[2500, 3] = bad  # in the second shard: the first is already written when it is found
    src = write_h5ad(tmp_path / "bad.h5ad", sp.csr_matrix(X), gene_names(80))
    err = run_cli(tmp_path, capsys, src, "--vocab", vocab_path, "--cells-per-shard", "1000")
    assert f"bad.h5ad: X holds 1 {word}" in err and "cell 2500 ('cell2500')" in err and "LOC_Os01g00003" in err


def test_gene_column_missing(tmp_path, capsys, vocab_path, good):
    err = run_cli(tmp_path, capsys, good, "--vocab", vocab_path, "--gene-column", "symbol")
    assert "good.h5ad: var has no column 'symbol' (--gene-column)" in err


def test_layer_missing(tmp_path, capsys, vocab_path, good):
    assert "good.h5ad: field layers/counts not found" in run_cli(tmp_path, capsys, good, "--vocab", vocab_path, "--layer", "counts")


def test_duplicate_gene_ids(tmp_path, capsys, vocab_path):
    genes = gene_names(80)
    genes[10] = genes[3]
    src = write_h5ad(tmp_path / "dup.h5ad", random_counts(20, 80), genes)
    err = run_cli(tmp_path, capsys, src, "--vocab", vocab_path)
    assert "dup.h5ad: 1 duplicate gene id(s) in var_names, e.g. LOC_Os01g00003" in err


def test_too_few_genes_in_vocabulary(tmp_path, capsys, vocab_path):
    genes = [f"Os01g{i:07d}" for i in range(80)]  # RAP-like ids, none in the vocabulary
    genes[:5] = gene_names(5)
    src = write_h5ad(tmp_path / "rap.h5ad", random_counts(20, 80), genes)
    err = run_cli(tmp_path, capsys, src, "--vocab", vocab_path)
    assert "rap.h5ad: only 5 of 80 genes (6.2%) of var_names are in the vocabulary" in err
    assert "--min-gene-fraction 0.1" in err and "--gene-map rap-to-msu" in err
    assert cli(["build-data", str(src), "--vocab", str(vocab_path), "--output", str(tmp_path / "ok"),
                "--min-gene-fraction", "0.05", "--quiet"]) == 0


def test_vocabulary_without_special_tokens(tmp_path, capsys, good):
    v = tmp_path / "v.json"
    v.write_text(json.dumps({g: i for i, g in enumerate(gene_names(80))}))
    err = run_cli(tmp_path, capsys, good, "--vocab", v)
    assert "v.json: vocabulary lacks the special token(s) <pad>, <cls>, <eoc>" in err


def test_existing_output_built_with_another_vocabulary(tmp_path, capsys, vocab_path, good):
    assert cli(["build-data", str(good), "--vocab", str(vocab_path), "--output", str(tmp_path / "ds"), "--quiet"]) == 0
    before = (tmp_path / "ds" / "manifest.json").read_bytes()
    other = tmp_path / "other.json"
    from ricefm.vocab import GeneVocab
    GeneVocab.from_genes(gene_names(100)).save(other)
    rc = cli(["build-data", str(good), "--vocab", str(other), "--output", str(tmp_path / "ds"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "ds: already holds a dataset built with another vocabulary" in err
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == before


def test_bad_obs_and_modality_columns(tmp_path, capsys, vocab_path, good):
    assert "good.h5ad: obs has no column 'batch' (--keep-obs)" in run_cli(
        tmp_path, capsys, good, "--vocab", vocab_path, "--keep-obs", "celltype,batch")
    err = run_cli(tmp_path, capsys, good, "--vocab", vocab_path, "--modality", "obs:celltype")
    assert "good.h5ad: obs['celltype'] (--modality) has values ['a', 'b']" in err


def test_cells_without_vocabulary_genes_are_counted_not_silent(tmp_path, vocab_path):
    X = sp.csr_matrix(np.float32([[1, 0, 0], [0, 0, 2], [0, 0, 0], [3, 4, 0]]))
    genes = [gene_names(2)[0], gene_names(2)[1], "not_in_vocab"]
    src = write_h5ad(tmp_path / "few.h5ad", X, genes)
    m = build_dataset([src], tmp_path / "ds", vocab_path=vocab_path, progress=False,
                      options=BuildOptions(min_gene_fraction=0.5))
    assert m["n_cells"] == 2 and m["cells_dropped"] == {"no_counts": 1, "no_vocab_genes": 1}
