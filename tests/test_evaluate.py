"""Evaluation suite: scib metrics on hand-checked cases, a CI-sized `ricefm benchmark` for both
backends, and clear errors without partial output."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from ricefm_cli.cli import main as cli
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


def test_zero_shot_metrics_and_pca_baseline_past_scanpys_approximate_neighbour_threshold(monkeypatch):
    """9,000 cells: scanpy switches to pynndescent at 8,192 (the path that crashed with pynndescent 0.7)."""
    import scanpy as sc

    from ricefm.evaluate.clustering import pca_baseline

    calls = []
    neighbors = sc.pp.neighbors
    monkeypatch.setattr(sc.pp, "neighbors", lambda *a, **k: calls.append(1) or neighbors(*a, **k))
    rng = np.random.default_rng(7)
    n, k = 9000, 6
    y = rng.integers(0, k, n)
    labels = pd.Series(np.asarray(list("abcdef"))[y])
    emb = (rng.normal(size=(k, 24)) * 3)[y] + rng.normal(size=(n, 24))
    m = zero_shot_metrics(emb.astype(np.float32), labels, asw_max_cells=4000)
    assert len(calls) == 1  # one kNN graph for all ten Leiden resolutions
    assert m["NMI"] > 0.95 and m["ARI"] > 0.95 and m["ASW_cells"] == 4000 and m["cells"] == n
    full = zero_shot_metrics(emb.astype(np.float32), labels, asw_max_cells=n)
    assert abs(full["ASW"] - m["ASW"]) < 0.02  # the seeded subsample estimates the full silhouette
    # counts with the same structure for the PCA baseline: cell type k raises genes 50k..50k+49
    rates = np.full((k, 400), 0.3)
    for c in range(k):
        rates[c, 50 * c:50 * c + 50] = 3.0
    counts = sp.csr_matrix(rng.poisson(rates[y]).astype(np.float32))
    pca = pca_baseline(counts)
    assert pca.shape == (n, 50)
    assert zero_shot_metrics(pca, labels, asw_max_cells=4000)["ARI"] > 0.9


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


@pytest.mark.slow  # ~60 s: the whole `ricefm benchmark` for both backends
def test_benchmark_writes_all_files_for_both_backends(small_rice, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli(["benchmark", "--checkpoint", str(small_rice / "ckpt"), "--dataset", str(small_rice / "rice300.h5ad"),
              "--label-key", "celltype", "--exclude-labels", "unlabeled", "--backends", "jax,torch", "--output", str(out),
              "--device", "cpu", "--quiet",
              "--annotation", "max_epochs=2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| AvgBIO |" in printed and "| macro_f1 |" in printed and "| Root hair |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "report.json", "report.md", "umap.png"]
    r = json.loads((out / "report.json").read_text())
    n_labelled = int((ad.read_h5ad(small_rice / "rice300.h5ad").obs["celltype"] != "unlabeled").sum())
    assert set(r["methods"]) == {"jax", "torch", "PCA"} and r["dataset"]["cells_evaluated"] == n_labelled < 300
    for m in r["methods"].values():
        assert 0 <= m["NMI"] <= 1 and -1 <= m["ARI"] <= 1 and 0 <= m["ASW"] <= 1
        assert m["AvgBIO"] == pytest.approx((m["NMI"] + m["ARI"] + m["ASW"]) / 3)
    assert r["agreement"]["cosine_min"] >= 0.99999 and r["agreement"]["max_abs_diff"] <= 1e-4
    assert all(r["methods"][b][k] > 0 for b in ("torch", "jax") for k in ("cells_per_s", "first_pass_cells_per_s"))
    assert (out / "umap.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    a = r["annotation"]
    assert a["classes"] == ["Root cortex", "Root epidermis", "Root hair"] and a["excluded_classes"] == {}
    assert set(a["methods"]) == {"jax", "torch", "PCA + LR"} and a["config"]["seeds"] == [0, 1, 2]
    for name, m in a["methods"].items():
        assert len(m["seeds"]) == 3 and [s["seed"] for s in m["seeds"]] == [0, 1, 2]
        f1 = [s["macro_f1"] for s in m["seeds"]]
        assert m["metrics"]["macro_f1"]["mean"] == pytest.approx(np.mean(f1))
        assert m["metrics"]["macro_f1"]["sd"] == pytest.approx(np.std(f1, ddof=1))
        assert np.sum(m["confusion_total"]) == sum(len(s["test_cells"]) for s in m["seeds"])
        for s in m["seeds"]:
            assert sum(c["support"] for c in s["per_class"].values()) == len(s["test_cells"])
            assert s["accuracy"] == pytest.approx(np.trace(s["confusion"]) / len(s["test_cells"]))
    for backend in ("jax", "torch"):
        m = a["methods"][backend]
        assert 1 <= m["seeds"][0]["epochs_run"] <= 2
        assert m["train_cells_per_s"] > 0 and m["first_epoch_train_cells_per_s"] > 0
        for s in m["seeds"]:  # every epoch trains on the whole train split: neither validation nor test cells
            assert {h["train_cells"] for h in s["history"]} == {a["cells"] - len(s["test_cells"]) - s["valid_cells"]}
    # the same seed gives the same split to every method
    assert a["methods"]["jax"]["seeds"][1]["test_cells"] == a["methods"]["PCA + LR"]["seeds"][1]["test_cells"]
    assert 0 <= a["agreement"]["same_test_prediction"] <= 1
    assert a["methods"]["PCA + LR"]["metrics"]["accuracy"]["mean"] > 0.6  # the three types are separable
    plan = r["plan"]  # printed before the long work, estimated from a measured warm-up
    assert plan["cells"] == 300 and plan["seeds"] == 3 and plan["max_epochs"] == 2 and plan["backends"] == ["jax", "torch"]
    assert plan["estimate_s"] == pytest.approx(sum(plan["embed_s"].values()) + sum(plan["fine_tune_s"].values()))
    assert all(v > 0 for v in plan["embed_s"].values())
    assert {"load cells", "embed jax", "embed torch", "zero-shot metrics jax", "PCA baseline", "annotation"} <= set(
        r["timings"]) and all(v >= 0 for v in r["timings"].values())
    assert r["methods"]["jax"]["max_seq_len"] == 3001  # the published inference length, as ricefm embed


def test_registered_datasets():
    rice = resolve_dataset("rice_root")
    assert (rice.label_key, rice.exclude_labels) == ("celltype", ("unlabeled",))
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
                  "torch", "--device", "cpu", "--output", str(out), "--quiet", "--no-annotation"])
        assert rc == 2, message
        assert message in capsys.readouterr().err
        assert not out.exists()
    assert cli(["benchmark", "--checkpoint", ckpt, "--dataset", data, "--output", str(tmp_path / "x"), "--quiet"]) == 2
    assert "pass --label-key" in capsys.readouterr().err
    common = ["benchmark", "--checkpoint", ckpt, "--dataset", data, "--label-key", "celltype", "--output",
              str(tmp_path / "y"), "--quiet", "--device", "cpu"]
    assert cli(common + ["--backends", "torch,tf"]) == 2
    assert "a comma-separated list of torch and jax" in capsys.readouterr().err
    assert cli(common + ["--annotation", "min_cells_per_class=500"]) == 2  # no class has 500 cells
    assert "annotation needs 2" in capsys.readouterr().err
    assert cli(common + ["--annotation", "seeds"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_pbmc68k_reduced_runs_with_its_own_vocabulary(tmp_path):
    """Nothing is rice-specific: human PBMCs (log-normalized .raw) with a vocabulary built from them."""
    pbmc = resolve_dataset("pbmc68k_reduced")
    vocab = GeneVocab.from_genes(ad.read_h5ad(pbmc.path, backed="r").var_names)
    torch.manual_seed(0)
    cfg = tiny.get_config()
    save_native(tmp_path / "ckpt", RiceFM.from_config(cfg.model, len(vocab)), cfg.model, vocab, cfg.data)
    out = tmp_path / "report"
    assert cli(["benchmark", "--checkpoint", str(tmp_path / "ckpt"), "--dataset", "pbmc68k_reduced", "--backends",
                "torch", "--device", "cpu", "--output", str(out), "--quiet", "--annotation", "max_epochs=1",
                "--annotation", "seeds=0,1"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["dataset"]["cells_evaluated"] == 700 and r["dataset"]["n_classes"] == 10
    assert r["methods"]["PCA"]["NMI"] > 0.3  # real structure the baseline finds
    a = r["annotation"]
    assert a["cells"] + sum(a["excluded_classes"].values()) == 700 and len(a["classes"]) >= 8
    assert a["methods"]["PCA + LR"]["metrics"]["accuracy"]["mean"] > 0.5
    assert 0 <= a["methods"]["torch"]["metrics"]["macro_f1"]["mean"] <= 1


def test_rice_root_atlas_is_found_where_the_recipe_puts_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RICEFM_DATA_DIR", str(tmp_path))
    with pytest.raises(RiceFMInputError, match=r"rice_root_atlas: .*rice_root_atlas.h5ad not found; prepare it once"):
        resolve_dataset("rice_root_atlas")
    (tmp_path / "rice_root_atlas.h5ad").write_bytes((REPO / "ricefm/resources/rice_root_SRP309176_2k.h5ad").read_bytes())
    ds = resolve_dataset("rice_root_atlas")
    assert ds.path == tmp_path / "rice_root_atlas.h5ad" and ds.label_key == "celltype" and ds.exclude_labels == ("unlabeled",)
