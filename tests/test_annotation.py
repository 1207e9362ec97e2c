"""Annotation fine-tuning: metrics on a hand-checked case, the stratified split, class weights,
head initialization, early stopping (with a scripted fake backend), config overrides, and the two
backends fine-tuning to the same logits from the same weights and batches."""

import anndata as ad
import numpy as np
import pytest
import torch

from ricefm.batching import TokenSpec
from ricefm.cells import TokenizedCells
from ricefm.errors import RiceFMInputError
from ricefm.evaluate import annotation as ann
from ricefm.shards.gene_space import VocabMapping, modality_codes, translated_genes
from ricefm.shards.sources import H5adSource
from ricefm.vocab import GeneVocab
from ricefm_configs import tiny
from ricefm_npu.checkpoints import save_native
from ricefm_npu.model import RiceFM

from conftest import REPO


def test_metrics_on_a_hand_checked_case():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    m = ann.classification_metrics(y_true, y_pred, ["a", "b", "c"])
    # precision a 1/2, b 2/3, c 1/1; recall a 1/2, b 2/2, c 1/2; F1 a 1/2, b 4/5, c 2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    perfect = ann.classification_metrics(y_true, y_true, ["a", "b", "c", "never"])  # absent class scores 0
    assert perfect["accuracy"] == 1.0 and perfect["per_class"]["never"]["support"] == 0


def test_stratified_split_is_disjoint_complete_and_per_class():
    y = np.repeat(np.arange(4), [100, 40, 10, 3])
    s = ann.stratified_split(y, (0.7, 0.1, 0.2), seed=0)
    parts = np.concatenate([s.train, s.valid, s.test])
    assert np.array_equal(np.sort(parts), np.arange(len(y)))  # disjoint and complete
    for part in (s.train, s.valid, s.test):
        assert set(y[part]) == {0, 1, 2, 3}  # every class everywhere
    assert [int((y[s.test] == c).sum()) for c in range(4)] == [20, 8, 2, 1]
    assert [int((y[s.valid] == c).sum()) for c in range(4)] == [10, 4, 1, 1]
    again, other = ann.stratified_split(y, (0.7, 0.1, 0.2), 0), ann.stratified_split(y, (0.7, 0.1, 0.2), 1)
    assert np.array_equal(again.test, s.test) and not np.array_equal(other.test, s.test)
    with pytest.raises(RiceFMInputError, match="class 1 has 2 cell"):
        ann.stratified_split(np.array([0, 0, 0, 1, 1]), (0.7, 0.1, 0.2), 0)
    with pytest.raises(RiceFMInputError, match="summing to 1"):
        ann.stratified_split(y, (0.7, 0.2, 0.2), 0)


def test_class_weights_and_head_init():
    w = ann.class_weights(np.array([0, 0, 0, 1]), 2, "balanced")
    np.testing.assert_allclose(w, [4 / (2 * 3), 4 / (2 * 1)])
    assert ann.class_weights(np.array([0, 1]), 2, "none").tolist() == [1.0, 1.0]
    head = ann.init_head(64, 5, 3, seed=7)
    assert {k: v.shape for k, v in head.items()} == {
        "cls_decoder._decoder.0.weight": (64, 64), "cls_decoder._decoder.0.bias": (64,),
        "cls_decoder._decoder.2.weight": (64,), "cls_decoder._decoder.2.bias": (64,),
        "cls_decoder._decoder.3.weight": (64, 64), "cls_decoder._decoder.3.bias": (64,),
        "cls_decoder._decoder.5.weight": (64,), "cls_decoder._decoder.5.bias": (64,),
        "cls_decoder.out_layer.weight": (5, 64), "cls_decoder.out_layer.bias": (5,)}
    assert np.abs(head["cls_decoder.out_layer.weight"]).max() <= 1 / 8 and head["cls_decoder._decoder.2.weight"].min() == 1
    assert np.array_equal(ann.init_head(64, 5, 3, 7)["cls_decoder._decoder.0.weight"], head["cls_decoder._decoder.0.weight"])
    assert not np.array_equal(ann.init_head(64, 5, 3, 8)["cls_decoder._decoder.0.weight"],
                              head["cls_decoder._decoder.0.weight"])
    # the same numbers load into the torch head (names and layouts are the published ones)
    model = RiceFM(100, d_model=64, n_heads=4, n_layers=1, d_hid=64, n_cls=5)
    model.cls_decoder.load_state_dict({k.removeprefix("cls_decoder."): torch.from_numpy(v) for k, v in head.items()})


def test_config_overrides():
    cfg = ann.annotation_config(["seeds=4", "freeze_encoder=true", "lr=0.0005", "split=0.8,0.1,0.1"])
    assert cfg.seeds == (4,) and cfg.freeze_encoder is True and cfg.lr == 0.0005 and cfg.split == (0.8, 0.1, 0.1)
    with pytest.raises(RiceFMInputError, match="has no field 'epochs'; did you mean max_epochs"):
        ann.annotation_config(["epochs=3"])
    with pytest.raises(RiceFMInputError, match="expected KEY=VALUE with KEY one of"):
        ann.annotation_config(["max_epochs"])
    with pytest.raises(RiceFMInputError, match="max_epochs takes a int"):
        ann.annotation_config(["max_epochs=lots"])


class ScriptedFinetuner:
    """A backend whose validation quality per epoch is scripted: cell i is predicted right when
    (i * 37) % 100 < 100 * quality. Tests the shared epoch loop, early stopping and restore."""

    def __init__(self, y, qualities, n_classes):
        self.y, self.qualities, self.n_classes = y, qualities, n_classes
        self.vocab = GeneVocab.from_genes(["g1", "g2"])
        self.model_config = tiny.get_config().model
        self.description = "scripted"

    def start(self, head, n_classes, cfg, steps_per_epoch, seed):
        self.steps, self.spe, self.epoch = 0, steps_per_epoch, 0
        self.started = (n_classes, steps_per_epoch, sorted(head))

    def train_step(self, batch, labels, weights):
        self.steps += 1
        self.epoch = self.steps // self.spe - 1 if self.steps % self.spe == 0 else self.steps // self.spe
        return 1.0 / self.steps

    def logits(self, batch):
        q = self.qualities[self.epoch]
        idx = batch["cell_index"]
        right = (idx * 37) % 100 < 100 * q
        pred = np.where(right, self.y[idx], (self.y[idx] + 1) % self.n_classes)
        return np.eye(self.n_classes, dtype=np.float32)[pred]

    def snapshot(self):
        return self.epoch

    def restore(self, epoch):
        self.epoch = epoch


def test_early_stopping_restores_the_best_epoch():
    y = np.repeat(np.arange(3), 40)
    cells = TokenizedCells(np.arange(len(y) + 1, dtype=np.int64) * 2, np.tile([0, 1], len(y)).astype(np.int32),
                           np.ones(2 * len(y), np.float32), np.ones(2 * len(y), np.float32), np.zeros(len(y), np.int8))
    ft = ScriptedFinetuner(y, [0.2, 0.9, 0.5, 0.4, 1.0, 1.0], 3)
    cfg = ann.annotation_config(["patience=2", "max_epochs=6", "batch_size=16", "seeds=0"])
    r = ann.AnnotationRun(ft, cells, y, ["a", "b", "c"], cfg, progress=False).run_seed(0)
    assert r["epochs_run"] == 4 and r["best_epoch"] == 1  # epochs 2 and 3 no better: stop before the 1.0s
    assert [h["epoch"] for h in r["history"]] == [0, 1, 2, 3]
    test = np.asarray(r["test_cells"])
    assert r["accuracy"] == pytest.approx(np.mean((test * 37) % 100 < 90))  # scored with epoch 1's model
    assert ft.started == (3, -(-84 // 16), sorted(ann.init_head(64, 3, 3, 0)))


@pytest.fixture(scope="module")
def rice_cells(tmp_path_factory):
    """120 labelled rice cells (3 types) tokenized for a random tiny checkpoint."""
    d = tmp_path_factory.mktemp("annot")
    vocab = GeneVocab.default()
    torch.manual_seed(0)
    cfg = tiny.get_config()
    save_native(d / "ckpt", RiceFM.from_config(cfg.model, len(vocab)), cfg.model, vocab, cfg.data)
    a = ad.read_h5ad(REPO / "ricefm/resources/rice_root_SRP309176_2k.h5ad")
    rows = np.concatenate([np.flatnonzero(a.obs["celltype"] == t)[:40]
                           for t in ("Root cortex", "Root epidermis", "Root hair")])
    a[rows].copy().write_h5ad(d / "cells.h5ad")
    src = H5adSource.open(d / "cells.h5ad")
    mapping = VocabMapping.build(src, translated_genes(src, None)[0], vocab, 0.1, None, None, 0)
    cells = TokenizedCells.from_mapped(mapping.apply(src.read_rows(0, src.n_obs)), modality_codes(src, "scrna"))
    src.close()
    return d / "ckpt", cells, np.repeat(np.arange(3), 40)


@pytest.mark.parametrize("freeze", [False, True])
def test_torch_and_jax_fine_tune_to_the_same_logits(rice_cells, freeze):
    ckpt, cells, y = rice_cells
    cfg = ann.annotation_config([f"freeze_encoder={freeze}", "dropout=0.0", "lr=0.001"])
    fts = {b: ann.load_finetuner(b, ckpt, "cpu") for b in ("torch", "jax")}
    head = ann.init_head(64, 3, 3, seed=0)
    weights = ann.class_weights(y, 3, "balanced")
    tokens = TokenSpec(fts["torch"].vocab.pad_id, fts["torch"].vocab.cls_id, -2.0)
    for ft in fts.values():
        ft.start(head, 3, cfg, steps_per_epoch=5, seed=0)
    probe = cells.batch(np.arange(0, 120, 3), tokens, 64, "highest", 32)
    start = {b: ft.logits(probe) for b, ft in fts.items()}
    np.testing.assert_allclose(start["jax"], start["torch"], atol=1e-5)
    before = {k: v.clone() for k, v in fts["torch"].model.state_dict().items()}
    rng = np.random.default_rng(0)
    losses = {"torch": [], "jax": []}
    for _ in range(15):  # three "epochs" of 5 steps: the lr decays twice
        rows = rng.choice(len(y), 24, replace=False)
        batch = cells.batch(rows, tokens, 64, "highest", 32)
        for b, ft in fts.items():
            losses[b].append(ft.train_step(batch, y[rows], weights))
    np.testing.assert_allclose(losses["jax"], losses["torch"], rtol=1e-5)
    end = {b: ft.logits(probe) for b, ft in fts.items()}
    np.testing.assert_allclose(end["jax"], end["torch"], atol=1e-4)
    assert np.abs(end["torch"] - start["torch"]).max() > 1e-2  # it did learn
    assert losses["torch"][-1] < losses["torch"][0]
    after = fts["torch"].model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    if freeze:
        assert changed and all(k.startswith("cls_decoder.") for k in changed)
    else:
        assert "transformer_encoder.layers.0.linear1.weight" in changed


def test_snapshot_restore_round_trip(rice_cells):
    ckpt, cells, y = rice_cells
    cfg = ann.annotation_config(["dropout=0.0", "lr=0.01"])
    tokens = TokenSpec(GeneVocab.default().pad_id, GeneVocab.default().cls_id, -2.0)
    batch = cells.batch(np.arange(24), tokens, 64)
    for backend in ("torch", "jax"):
        ft = ann.load_finetuner(backend, ckpt, "cpu")
        ft.start(ann.init_head(64, 3, 3, 0), 3, cfg, 5, 0)
        snap, first = ft.snapshot(), ft.logits(batch)
        ft.train_step(batch, y[:24], np.ones(3, np.float32))
        assert np.abs(ft.logits(batch) - first).max() > 1e-3
        ft.restore(snap)
        np.testing.assert_array_equal(ft.logits(batch), first)
