"""The user's four tasks as commands: embed (published protocol), finetune, annotate, genes."""

import json

import anndata as ad
import numpy as np
import pytest
import torch

from converters.formats import Checkpoint, convert, load_checkpoint, save_checkpoint
from ricefm.errors import RiceFMInputError
from ricefm.evaluate.annotation import classification_metrics, validation_split
from ricefm.gene_embeddings import token_embeddings
from ricefm.init import initial_state
from ricefm.vocab import GeneVocab
from ricefm_cli.cli import main as cli
from ricefm_configs import tiny
from ricefm_npu.checkpoints import load_torch_checkpoint

from conftest import REPO

SHIPPED = REPO / "ricefm/resources/rice_root_SRP309176_2k.h5ad"
CLASSES = ["Exodermis", "Root cortex", "Root endodermis", "Root epidermis"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny pretrained-format checkpoint trained at 256 tokens, and a 4-class reference / query."""
    d = tmp_path_factory.mktemp("tasks")
    model, vocab = tiny.get_config().model, GeneVocab.default()
    data = tiny.get_config().data
    data.max_seq_len = 256
    save_checkpoint(Checkpoint(initial_state(model, len(vocab), seed=3), model, vocab, "seed"), d / "pre", "seed", data)
    a = ad.read_h5ad(SHIPPED)
    rows = np.concatenate([np.flatnonzero(a.obs.celltype == c)[:60] for c in CLASSES])
    a[rows].copy().write_h5ad(d / "ref.h5ad")
    long = np.flatnonzero(np.diff(a.X.tocsr().indptr) > 400)[:12]  # cells with more genes than 256 tokens hold
    a[long].copy().write_h5ad(d / "long.h5ad")
    return d


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli([str(x) for x in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_embed_defaults_to_the_published_inference_length(work, capsys):
    common = ["embed", "--checkpoint", work / "pre", "--input", work / "long.h5ad", "--device", "cpu", "--quiet"]
    for name, extra in (("default", []), ("3001", ["--max-seq-len", "3001"]), ("256", ["--max-seq-len", "256"])):
        assert run([*common, "--output", work / f"emb_{name}.h5ad", *extra], capsys)[0] == 0
    emb = {k: ad.read_h5ad(work / f"emb_{k}.h5ad") for k in ("default", "3001", "256")}
    assert load_checkpoint(work / "pre").model.max_seq_len == 256  # trained at 256 ...
    assert emb["default"].uns["ricefm"]["max_seq_len"] == 3001  # ... embedded with <cls> + up to 3,000 genes
    np.testing.assert_array_equal(emb["default"].obsm["X_ricefm"], emb["3001"].obsm["X_ricefm"])
    cut = np.abs(emb["default"].obsm["X_ricefm"] - emb["256"].obsm["X_ricefm"]).max(1)
    assert (cut > 1e-3).all()  # every cell here has more genes than 255: cutting them changes its embedding


@pytest.fixture(scope="module")
def finetuned(work, tmp_path_factory):
    out = work / "ft"
    code = cli(["finetune", "--checkpoint", str(work / "pre"), "--input", str(work / "ref.h5ad"), "--label-key",
                "celltype", "--output", str(out), "--device", "cpu", "--quiet", "--config.max_epochs=3",
                "--config.max_seq_len=96", "--config.batch_size=24", "--config.lr=3e-3"])
    assert code == 0
    return out


def test_finetune_writes_a_published_checkpoint_with_its_classes(finetuned, work):
    args = json.loads((finetuned / "args.json").read_text())
    record = args["finetune"]
    assert args["n_cls"] == 4 and record["class_names"] == CLASSES and record["label_key"] == "celltype"
    assert record["settings"]["max_seq_len"] == 96 and record["settings"]["max_epochs"] == 3
    assert record["train_cells"] + record["valid_cells"] == 240 and record["valid_cells"] == 24  # 10% of each class
    assert 0 <= record["best_epoch"] < len(record["history"]) <= 3
    best = record["history"][record["best_epoch"]]
    assert record["validation"]["macro_f1"] == pytest.approx(best["valid_macro_f1"], abs=1e-12)
    assert best["valid_macro_f1"] == max(h["valid_macro_f1"] for h in record["history"])
    assert (finetuned / "checksums.sha256").is_file()
    ckpt = load_checkpoint(finetuned)
    assert ckpt.n_classes == 4 and ckpt.finetune == record
    assert list(ckpt.state)[-2:] == ["cls_decoder.out_layer.weight", "cls_decoder.out_layer.bias"]  # published order
    pre = load_checkpoint(work / "pre")
    moved = max(float(np.abs(ckpt.state[k] - pre.state[k]).max()) for k in pre.state)
    assert moved > 1e-4  # the encoder was fine-tuned, not frozen
    for fmt in ("torch", "flax"):  # every format carries the head and the record
        convert(finetuned, work / f"ft_{fmt}", fmt)
        again = load_checkpoint(work / f"ft_{fmt}")
        assert again.finetune == record and all(np.array_equal(again.state[k], ckpt.state[k]) for k in ckpt.state)
    model, _, _ = load_torch_checkpoint(finetuned)  # the embedders and converters load it as any checkpoint
    assert model.cls_decoder.out_layer.weight.shape == (4, 64)


def test_annotate_reproduces_the_fine_tuning_validation_and_agrees_across_backends(finetuned, work, capsys):
    outs = {}
    for backend, ckpt in (("torch", finetuned), ("jax", work / "ft_flax")):
        out = work / f"annotated_{backend}.h5ad"
        code, text, _ = run(["annotate", "--checkpoint", ckpt, "--input", work / "ref.h5ad", "--output", out,
                             "--backend", backend, "--device", "cpu", "--label-key", "celltype", "--quiet"], capsys)
        assert code == 0 and "accuracy" in text
        outs[backend] = ad.read_h5ad(out)
    a, b = outs["torch"], outs["jax"]
    assert a.uns["ricefm_annotation"]["max_seq_len"] == 96  # the fine-tuning length, from the checkpoint
    assert list(a.uns["ricefm_annotation"]["class_names"]) == CLASSES and a.obsm["ricefm_proba"].shape == (240, 4)
    np.testing.assert_allclose(a.obsm["ricefm_proba"], b.obsm["ricefm_proba"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(a.obsm["X_ricefm"], b.obsm["X_ricefm"], atol=1e-5, rtol=1e-5)
    proba = a.obsm["ricefm_proba"]
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(a.obs["ricefm_confidence"], proba.max(1), rtol=1e-6)
    labels = np.where(proba.max(1) < 0.5, "unassigned", np.asarray(CLASSES)[proba.argmax(1)])
    assert list(a.obs["ricefm_label"].cat.categories) == [*CLASSES, "unassigned"]
    assert (a.obs["ricefm_label"].astype(str).to_numpy() == labels).all()
    # the validation cells of the fine-tuning, annotated now, give the F1 the checkpoint recorded
    record = load_checkpoint(finetuned).finetune
    y = np.searchsorted(CLASSES, a.obs["celltype"].astype(str).to_numpy())
    _, valid = validation_split(y, 0.1, record["seed"])
    f1 = classification_metrics(y[valid], proba[valid].argmax(1), CLASSES)["macro_f1"]
    assert f1 == pytest.approx(record["validation"]["macro_f1"], abs=1e-9)
    metrics = json.loads((work / "annotated_torch.metrics.json").read_text())
    assert metrics["cells_scored"] == 240 and metrics["accuracy"] == pytest.approx((proba.argmax(1) == y).mean())
    assert (work / "annotated_torch.confusion.png").stat().st_size > 1000


def test_annotation_embedding_is_the_fine_tuned_encoder(finetuned, work, capsys):
    assert run(["embed", "--checkpoint", finetuned, "--input", work / "ref.h5ad", "--output", work / "ft_emb.h5ad",
                "--device", "cpu", "--max-seq-len", "96", "--quiet"], capsys)[0] == 0
    np.testing.assert_allclose(ad.read_h5ad(work / "ft_emb.h5ad").obsm["X_ricefm"],
                               ad.read_h5ad(work / "annotated_torch.h5ad").obsm["X_ricefm"], atol=1e-6)


def test_confidence_threshold_and_bad_requests(finetuned, work, capsys):
    code, _, _ = run(["annotate", "--checkpoint", finetuned, "--input", work / "long.h5ad", "--output",
                      work / "all_unassigned.h5ad", "--device", "cpu", "--min-confidence", "1", "--quiet"], capsys)
    assert code == 0 and (ad.read_h5ad(work / "all_unassigned.h5ad").obs["ricefm_label"] == "unassigned").all()
    bad = [
        (["annotate", "--checkpoint", work / "pre", "--input", work / "long.h5ad", "--output", work / "x.h5ad",
          "--device", "cpu"], "not a fine-tuned checkpoint"),
        (["annotate", "--checkpoint", finetuned, "--input", work / "long.h5ad", "--output", work / "x.h5ad",
          "--min-confidence", "1.5"], "--min-confidence 1.5"),
        (["finetune", "--checkpoint", work / "pre", "--input", work / "ref.h5ad", "--label-key", "celltype",
          "--output", work / "y", "--config.max_epoch=2"], "has no field 'max_epoch'; did you mean max_epochs"),
        (["finetune", "--checkpoint", work / "pre", "--input", work / "ref.h5ad", "--label-key", "celltype",
          "--output", finetuned], "exists and is not empty"),
        (["finetune", "--checkpoint", work / "pre", "--input", work / "ref.h5ad", "--label-key", "nope",
          "--output", work / "y", "--device", "cpu"], "obs has no column 'nope'"),
        (["embed", "--checkpoint", work / "pre", "--input", work / "ref.h5ad", "--output", work / "z.h5ad",
          "--config.lr=1"], None),
    ]
    for argv, message in bad:
        if message is None:  # --config. overrides belong to finetune only: argparse's usage error
            with pytest.raises(SystemExit):
                cli([str(x) for x in argv])
            capsys.readouterr()
            continue
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (work / "y").exists() and not (work / "x.h5ad").exists()


def test_gene_embeddings_are_the_token_encoder(finetuned, work, capsys, tmp_path):
    vocab = GeneVocab.default()
    genes = [g for g in list(vocab.as_dict())[:40:5]]
    (tmp_path / "genes.txt").write_text("# my genes\n" + "\n".join([*genes, "NOT_A_GENE"]) + "\n")
    code, text, _ = run(["genes", "--checkpoint", finetuned, "--genes", tmp_path / "genes.txt", "--output",
                         tmp_path / "out", "--threshold", "0.2"], capsys)
    assert code == 0 and "NOT_A_GENE" in text
    model, _, _ = load_torch_checkpoint(finetuned)
    with torch.no_grad():
        want = model.encoder.enc_norm(model.encoder.embedding(torch.tensor(vocab.lookup(genes)))).numpy()
    import pandas as pd

    table = pd.read_csv(tmp_path / "out/embeddings.tsv", sep="\t", index_col=0)
    assert list(table.index) == genes
    np.testing.assert_allclose(table.drop(columns="vocab_gene").to_numpy(), want, atol=1e-5)
    sim = pd.read_csv(tmp_path / "out/similarity.tsv", sep="\t", index_col=0).to_numpy()
    unit = want / np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(sim, unit @ unit.T, atol=1e-5)
    pairs = pd.read_csv(tmp_path / "out/pairs.tsv", sep="\t")
    assert len(pairs) == int((np.triu(unit @ unit.T, 1) >= 0.2).sum()) and (pairs.cosine >= 0.2).all()
    assert (tmp_path / "out/unknown_genes.txt").read_text() == "NOT_A_GENE\n"
    assert (tmp_path / "out/network.png").stat().st_size > 1000
    state = load_checkpoint(finetuned).state
    np.testing.assert_allclose(token_embeddings(state, vocab.lookup(genes), 1e-5), want, atol=1e-5)


def test_gene_map_translates_rap_ids(finetuned, tmp_path, capsys):
    from ricefm.gene_maps import load_gene_map

    table = load_gene_map("rap-to-msu")
    rap = [r for r in list(table)[:200] if table[r] in GeneVocab.default()][:3]
    code, _, _ = run(["genes", "--checkpoint", finetuned, "--genes", ",".join(rap), "--gene-map", "rap-to-msu",
                      "--output", tmp_path / "g"], capsys)
    assert code == 0
    summary = json.loads((tmp_path / "g/summary.json").read_text())
    assert summary["genes_found"] == 3 and summary["unknown_genes"] == []
    code, _, err = run(["genes", "--checkpoint", finetuned, "--genes", ",".join(rap), "--output", tmp_path / "h"],
                       capsys)
    assert code == 2 and "need --gene-map rap-to-msu" in err
    with pytest.raises(RiceFMInputError, match="file not found"):
        from ricefm.gene_embeddings import read_gene_list

        read_gene_list(str(tmp_path / "missing.txt"))


def test_jax_fine_tuning_makes_the_same_kind_of_checkpoint(work, capsys):
    out = work / "ft_jax"
    code, _, _ = run(["finetune", "--checkpoint", work / "pre", "--input", work / "ref.h5ad", "--label-key",
                      "celltype", "--output", out, "--backend", "jax", "--device", "cpu", "--quiet",
                      "--config.max_epochs=1", "--config.max_seq_len=96", "--config.batch_size=24"], capsys)
    assert code == 0
    record = load_checkpoint(out).finetune
    assert record["class_names"] == CLASSES and record["backend"].startswith("jax")
    # torch annotates the JAX-tuned weights and finds the validation F1 JAX recorded
    assert run(["annotate", "--checkpoint", out, "--input", work / "ref.h5ad", "--output", work / "by_torch.h5ad",
                "--device", "cpu", "--quiet"], capsys)[0] == 0
    a = ad.read_h5ad(work / "by_torch.h5ad")
    y = np.searchsorted(CLASSES, a.obs["celltype"].astype(str).to_numpy())
    _, valid = validation_split(y, 0.1, record["seed"])
    f1 = classification_metrics(y[valid], a.obsm["ricefm_proba"][valid].argmax(1), CLASSES)["macro_f1"]
    assert f1 == pytest.approx(record["validation"]["macro_f1"], abs=1e-9)
