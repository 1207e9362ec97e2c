"""Evaluation suite: scib metrics on hand-checked cases, a CI-sized `ricefm benchmark` for both
backends, and clear errors without partial output."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from ricefm.cli import main as cli
from ricefm.errors import RiceFMInputError
from ricefm.evaluate.clustering import zero_shot_metrics
from ricefm.evaluate.datasets import resolve_dataset
from ricefm.vocab import GeneVocab
from ricefm_configs import tiny
from ricefm_npu.checkpoints import save_native
from ricefm_npu.model import RiceFM

from conftest import FIXTURES, REPO


def test_perfectly_separated_embedding_scores_one():
    rng = np.random.default_rng(0)
    labels = pd.Series(np.repeat(["a", "b", "c", "d"], 60))
    centers = rng.normal(size=(4, 16)) * 20
    emb = centers[np.repeat(np.arange(4), 60)] + rng.normal(size=(240, 16)) * 0.1
    m = zero_shot_metrics(emb, labels)
    assert m["NMI"] == pytest.approx(1.0) and m["ARI"] == pytest.approx(1.0)
    assert m["ASW"] > 0.95 and m["AvgBIO"] > 0.98 and m["n_clusters"] == 4


def test_random_labels_score_near_zero():
    rng = np.random.default_rng(1)
    m = zero_shot_metrics(rng.normal(size=(300, 16)), pd.Series(rng.choice(list("abcd"), 300)))
    assert m["NMI"] < 0.1 and abs(m["ARI"]) < 0.05 and m["ASW"] < 0.55


@pytest.fixture(scope="module")
def small_rice(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    a = ad.read_h5ad(REPO / "ricefm/resources/rice_root_SRP309176_2k.h5ad")
    keep = a.obs["celltype"].isin(["Root cortex", "Root epidermis", "Root hair", "unlabeled"]).to_numpy()
    sub = a[np.flatnonzero(keep)[:300]].copy()
    sub.write_h5ad(d / "rice300.h5ad")
    vocab = GeneVocab.default()
    torch.manual_seed(0)
    cfg = tiny.get_config()
    save_native(d / "ckpt", RiceFM.from_config(cfg.model, len(vocab)), cfg.model, vocab, cfg.data)
    return d


def test_benchmark_writes_all_files_for_both_backends(small_rice, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli(["benchmark", "--checkpoint", str(small_rice / "ckpt"), "--dataset", str(small_rice / "rice300.h5ad"),
              "--label-key", "celltype", "--backends", "jax,torch", "--output", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0
    assert "| AvgBIO |" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "umap.png"]
    r = json.loads((out / "report.json").read_text())
    assert set(r["methods"]) == {"jax", "torch", "PCA"} and r["dataset"]["cells_evaluated"] == 300
    for m in r["methods"].values():
        assert 0 <= m["NMI"] <= 1 and -1 <= m["ARI"] <= 1 and 0 <= m["ASW"] <= 1
        assert m["AvgBIO"] == pytest.approx((m["NMI"] + m["ARI"] + m["ASW"]) / 3)
    assert r["agreement"]["cosine_min"] >= 0.99999 and r["agreement"]["max_abs_diff"] <= 1e-4
    assert r["methods"]["torch"]["cells_per_s"] > 0 and r["methods"]["jax"]["cells_per_s"] > 0
    assert (out / "umap.png").read_bytes()[:4] == b"\x89PNG"


def test_registered_datasets():
    rice = resolve_dataset("rice_root")
    assert (rice.label_key, rice.batch_key, rice.exclude_labels) == ("celltype", "sample", ("unlabeled",))
    pbmc = resolve_dataset("pbmc68k_reduced")
    a = ad.read_h5ad(pbmc.path)
    assert a.n_obs == 700 and pbmc.label_key == "bulk_labels" and a.X.min() >= 0  # the log-normalized .raw
    with pytest.raises(RiceFMInputError, match="neither a registered dataset"):
        resolve_dataset("nope")


def test_bad_inputs_leave_no_output(small_rice, tmp_path, capsys):
    ckpt, data = str(small_rice / "ckpt"), str(small_rice / "rice300.h5ad")
    one = ad.read_h5ad(data)
    one.obs["same"] = "x"
    one.write_h5ad(tmp_path / "one.h5ad")
    empty = one.copy()
    X = empty.X.toarray()
    X[0] = 0
    empty.X = sp.csr_matrix(X)
    empty.obs["same"] = ["x", "y"] * 150
    empty.write_h5ad(tmp_path / "empty.h5ad")
    cases = [
        ([ckpt, data, "nope"], "obs has no column 'nope'"),
        ([ckpt, str(tmp_path / "one.h5ad"), "same"], "has 1 class(es)"),
        ([str(FIXTURES), data, "celltype"], "are in the vocabulary"),  # synthetic 120-gene vocabulary
        ([ckpt, str(tmp_path / "empty.h5ad"), "same"], "1 evaluated cells have no gene"),
    ]
    for i, ((checkpoint, dataset, label), message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        rc = cli(["benchmark", "--checkpoint", checkpoint, "--dataset", dataset, "--label-key", label, "--backends",
                  "torch", "--device", "cpu", "--output", str(out), "--quiet"])
        assert rc == 2, message
        assert message in capsys.readouterr().err
        assert not out.exists()
    assert cli(["benchmark", "--checkpoint", ckpt, "--dataset", data, "--output", str(tmp_path / "x"), "--quiet"]) == 2
    assert "pass --label-key" in capsys.readouterr().err
