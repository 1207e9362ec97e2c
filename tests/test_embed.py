"""`ricefm embed --backend torch` gives the published model's embeddings, from any checkpoint format."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import ricefm.embed as embed_mod
from ricefm_cli.cli import main as cli
from ricefm.embed import embed_h5ad, load_embedder
from ricefm.vocab import GeneVocab
from ricefm_npu.checkpoints import load_published, save_native

from conftest import FIXTURES


@pytest.fixture(scope="module")
def fixture_h5ad(tmp_path_factory, reference):
    vocab = GeneVocab.load(FIXTURES / "vocab.json")
    names = {i: g for g, i in vocab.as_dict().items()}
    genes = [names[int(i)] for i in reference["in/raw_col_gene_ids"]]
    obs = pd.DataFrame({"assay": np.where(reference["in/mod_types"] == 1, "spatial", "scrna"),
                        "celltype": list("abababab")}, index=[f"c{i}" for i in range(8)])
    path = tmp_path_factory.mktemp("embed") / "cells.h5ad"
    ad.AnnData(X=sp.csr_matrix(reference["in/raw_counts"]), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def test_published_checkpoint_gives_published_embeddings(fixture_h5ad, reference, tmp_path, capsys):
    out = tmp_path / "emb.h5ad"
    rc = cli(["embed", "--checkpoint", str(FIXTURES), "--input", str(fixture_h5ad), "--output", str(out),
              "--backend", "torch", "--device", "cpu", "--max-seq-len", "200", "--modality", "obs:assay",
              "--batch-size", "3", "--quiet"])
    assert rc == 0
    assert "obsm['X_ricefm'] for 8 cells" in capsys.readouterr().out
    a = ad.read_h5ad(out)
    np.testing.assert_allclose(a.obsm["X_ricefm"], reference["infer/cell_emb"], atol=1e-4, rtol=0)
    assert a.uns["ricefm"]["max_seq_len"] == 200 and a.uns["ricefm"]["genes_matched"] == 120
    src = ad.read_h5ad(fixture_h5ad)
    assert (a.X != src.X).nnz == 0 and a.obs.equals(src.obs)  # the input is carried over unchanged


def test_every_checkpoint_format_and_block_size_gives_identical_embeddings(fixture_h5ad, tmp_path, monkeypatch):
    model, cfg, vocab = load_published(FIXTURES)
    save_native(tmp_path / "native", model, cfg, vocab)
    results = []
    for ckpt, block in ((FIXTURES, 4096), (tmp_path / "native", 4096), (FIXTURES, 3)):
        monkeypatch.setattr(embed_mod, "BLOCK_CELLS", block)
        embedder = load_embedder("torch", ckpt, device="cpu")
        embed_h5ad(fixture_h5ad, tmp_path / "o.h5ad", embedder, batch_size=2, max_seq_len=32, progress=False)
        results.append(ad.read_h5ad(tmp_path / "o.h5ad").obsm["X_ricefm"])
    np.testing.assert_array_equal(results[1], results[0])  # same weights, other format: bit-identical
    # other blocks change a batch's padded length only: same numbers up to float summation order
    np.testing.assert_allclose(results[2], results[0], atol=1e-5, rtol=0)


def test_long_cells_keep_their_highest_genes(fixture_h5ad, tmp_path):
    """max_seq_len 16: each cell is <cls> + its 15 highest-count genes (ties by column), binned over all genes."""
    import torch

    from ricefm.binning import bin_cell

    embedder = load_embedder("torch", FIXTURES, device="cpu")
    embed_h5ad(fixture_h5ad, tmp_path / "o.h5ad", embedder, max_seq_len=16, batch_size=8, modality="obs:assay",
               progress=False)
    got = ad.read_h5ad(tmp_path / "o.h5ad").obsm["X_ricefm"]
    src = ad.read_h5ad(fixture_h5ad)
    X, ids = src.X.toarray(), embedder.vocab.lookup(src.var_names)
    gene_ids = np.full((8, 16), embedder.vocab.pad_id)
    values = np.full((8, 16), -2.0, np.float32)
    gene_ids[:, 0] = embedder.vocab.cls_id
    for i, row in enumerate(X):
        nz = np.flatnonzero(row)
        bins = bin_cell(row[nz])
        keep = np.sort(np.argsort(-row[nz], kind="stable")[:15])
        gene_ids[i, 1:1 + len(keep)] = ids[nz[keep]]
        values[i, 1:1 + len(keep)] = bins[keep]
    mods = torch.from_numpy((src.obs["assay"] == "spatial").to_numpy().astype(np.int64))
    with torch.no_grad():
        want = embedder.model(torch.from_numpy(gene_ids), torch.from_numpy(values),
                              torch.from_numpy(gene_ids == embedder.vocab.pad_id), mods)["cell_emb"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_embed_errors(fixture_h5ad, tmp_path, capsys):
    rc = cli(["embed", "--checkpoint", str(tmp_path), "--input", str(fixture_h5ad), "--output", str(tmp_path / "o.h5ad"),
              "--quiet"])
    assert rc == 2 and "not a riceFM checkpoint" in capsys.readouterr().err
    rc = cli(["embed", "--checkpoint", str(FIXTURES), "--input", str(fixture_h5ad), "--output", str(fixture_h5ad),
              "--device", "cpu", "--quiet"])
    assert rc == 2 and "must differ from --input" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()
