"""build-data: exact round trip for every matrix layout, gene/obs/modality options, summary, CLI."""

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from ricefm.binning import bin_cell
from ricefm_cli.cli import main as cli
from ricefm.shards import ShardedCells, sources
from ricefm.shards.build import BuildOptions, build_dataset
from ricefm.vocab import GeneVocab

from conftest import gene_names, random_counts, write_h5ad


def read_all(ds: ShardedCells):
    return ds.read(np.arange(len(ds)), arrays=("gene_ids", "values", "bins"))


def assert_cells_equal(ds, cells, counts, col_ids, rows):
    """Every kept cell holds exactly its non-zero in-vocabulary genes (in column order), values and bins."""
    counts = sp.csr_matrix(counts).sorted_indices()
    for i, r in enumerate(rows):
        row = counts[r]
        keep = col_ids[row.indices] >= 0
        np.testing.assert_array_equal(cells.cell(i, "gene_ids"), col_ids[row.indices][keep])
        np.testing.assert_array_equal(cells.cell(i, "values"), row.data[keep])
        np.testing.assert_array_equal(cells.cell(i, "bins"), bin_cell(row.data[keep]))


@pytest.mark.parametrize("layout", ["csr", "csc", "dense", "layer", "int_counts"])
def test_round_trip_is_exact_for_every_layout(tmp_path, vocab_path, layout, monkeypatch):
    # small passes/blocks so the CSC transpose and dense sub-blocks take many steps
    monkeypatch.setattr(sources, "CSC_PASS_NONZEROS", 997)
    monkeypatch.setattr(sources, "DENSE_BLOCK_VALUES", 4000)
    counts = random_counts(230, 400, density=0.15, seed=1)
    counts = sp.diags(np.float32([0 if i == 7 else 1 for i in range(230)])) @ counts  # cell 7: no counts
    counts.eliminate_zeros()
    counts = sp.csr_matrix(counts, dtype=np.float32)  # stored with unsorted indices, as some writers do
    genes = gene_names(400)  # 300 of 400 are in the vocabulary
    X = {"csr": counts, "csc": counts.tocsc(), "dense": counts.toarray(), "layer": sp.csr_matrix(counts.shape, dtype=np.float32),
         "int_counts": counts.astype(np.int64)}[layout]
    layers = {"counts": counts} if layout == "layer" else None
    src = write_h5ad(tmp_path / "in.h5ad", X, genes, layers=layers)
    opts = BuildOptions(cells_per_shard=100, layer="counts" if layout == "layer" else None)
    m = build_dataset([src], tmp_path / "ds", vocab_path=vocab_path, options=opts, progress=False)
    ds = ShardedCells(tmp_path / "ds")
    col_ids = GeneVocab.load(vocab_path).lookup(genes)
    has_vocab_gene = np.diff(sp.csr_matrix(counts[:, :300]).indptr) > 0
    assert len(ds) == m["n_cells"] == has_vocab_gene.sum()
    assert m["cells_dropped"]["no_counts"] == 1
    assert m["cells_dropped"]["no_vocab_genes"] == 230 - 1 - has_vocab_gene.sum()
    assert [s["rows"] for s in m["shards"]] == [[0, 100], [100, 200], [200, 230]]
    assert m["sources"][0]["genes_matched"] == 300 and m["sources"][0]["genes_unmatched"] == 100
    cells = read_all(ds)
    rows = np.flatnonzero(has_vocab_gene)
    assert_cells_equal(ds, cells, counts, col_ids, rows)
    assert m["n_nonzero"] == int(cells.lengths.sum())
    src_rows = np.concatenate([ds._array(k, "source_row").read().result() for k in range(3)])
    np.testing.assert_array_equal(src_rows, rows)


def test_many_files_obs_columns_and_modality_from_obs(tmp_path, vocab_path):
    a = random_counts(60, 120, seed=2)
    b = random_counts(50, 90, seed=3)
    fa = write_h5ad(tmp_path / "a.h5ad", a, gene_names(120), obs={
        "celltype": ["root hair", "cortex", None] * 20, "tech": ["scrna", "spatial"] * 30})
    fb = write_h5ad(tmp_path / "b.h5ad", b, gene_names(90)[::-1], obs={
        "celltype": ["xylem"] * 50, "tech": ["ST"] * 50})
    m = build_dataset([fa, fb], tmp_path / "ds", vocab_path=vocab_path, progress=False,
                      options=BuildOptions(cells_per_shard=45, keep_obs=("celltype",), modality="obs:tech"))
    ds = ShardedCells(tmp_path / "ds")
    assert m["obs_columns"] == {"celltype": ["cortex", "root hair", "xylem"]}
    codes, cats = ds.obs_codes("celltype")
    want = np.array([1, 0, -1] * 20 + [2] * 50)
    np.testing.assert_array_equal(codes, want)
    np.testing.assert_array_equal(ds.modality(), [0, 1] * 30 + [1] * 50)
    assert m["modality_counts"] == {"scrna": 30, "spatial": 80}
    cells = read_all(ds)
    vocab = GeneVocab.load(vocab_path)
    assert_cells_equal(ds, cells, a, vocab.lookup(gene_names(120)), range(60))
    second = ds.read(np.arange(60, 110), arrays=("gene_ids", "values", "bins"))
    assert_cells_equal(ds, second, b, vocab.lookup(gene_names(90)[::-1]), range(50))
    # zarr-python sees a shard as a group of arrays
    import zarr
    g = zarr.open_group(str(tmp_path / "ds" / "shard-00001"), mode="r")
    assert g.attrs["n_cells"] == 45 and g["gene_ids"].dtype == np.int32


def test_spatial_flag_gene_column_and_build_vocab(tmp_path):
    X = random_counts(40, 50, seed=4)
    src = write_h5ad(tmp_path / "in.h5ad", X, [f"idx{i}" for i in range(50)],
                     var={"symbol": [f"G{i:03d}" for i in range(50)]})
    rc = cli(["build-data", str(src), "--output", str(tmp_path / "ds"), "--build-vocab", "--vocab",
               str(tmp_path / "built.json"), "--gene-column", "symbol", "--modality", "spatial", "--quiet"])
    assert rc == 0
    vocab = GeneVocab.load(tmp_path / "built.json")
    assert vocab == GeneVocab.load(tmp_path / "ds" / "vocab.json")
    assert (vocab.n_genes, vocab["G000"], vocab.pad_id) == (50, 0, 50)
    ds = ShardedCells(tmp_path / "ds")
    assert (ds.modality() == 1).all()
    assert_cells_equal(ds, read_all(ds), X, vocab.lookup([f"G{i:03d}" for i in range(50)]), range(40))


def test_rap_ids_join_msu_vocabulary_through_gene_map(tmp_path, capsys):
    rap = ["Os01g0100100", "Os01g0100200", "Os01g0100300", "NotAGene1", "Os01g0100400"]
    X = sp.csr_matrix(np.float32([[1, 2, 0, 5, 3], [0, 0, 4, 1, 0]]))
    src = write_h5ad(tmp_path / "rap.h5ad", X, rap)
    assert cli(["build-data", str(src), "--output", str(tmp_path / "ds"), "--gene-map", "rap-to-msu", "--quiet"]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())["sources"][0]
    assert m["genes_mapped_by_table"] >= 2 and "mapped by table" in out
    ds = ShardedCells(tmp_path / "ds")
    v = GeneVocab.default()
    assert v["LOC_Os01g01010"] in ds.read([0]).cell(0, "gene_ids")


def test_real_rice_data_summary(tmp_path, capsys):
    from conftest import REPO
    src = REPO / "ricefm/resources/rice_root_SRP309176_2k.h5ad"
    assert cli(["build-data", str(src), "--output", str(tmp_path / "ds"), "--keep-obs", "celltype,sample",
                "--cells-per-shard", "1500", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2,000 cells, 1,165,687 non-zero values in 2 shard(s)" in out
    assert "genes in vocabulary 7,000 / 7,000" in out and "cells dropped: 0" in out
    a = ad.read_h5ad(src)
    ds = ShardedCells(tmp_path / "ds")
    codes, cats = ds.obs_codes("celltype")
    assert (np.asarray(cats)[codes] == a.obs["celltype"].astype(str).to_numpy()).all()
    # a second run with the same arguments finds the dataset complete and changes nothing
    before = (tmp_path / "ds" / "manifest.json").read_bytes()
    assert cli(["build-data", str(src), "--output", str(tmp_path / "ds"), "--keep-obs", "celltype,sample",
                "--cells-per-shard", "1500", "--quiet"]) == 0
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == before
