import numpy as np
import pytest
import scipy.sparse as sp

from ricefm.batching import (BatchStream, TokenSpec, batch_cells, collate_generative, collate_pcpt, epoch_order,
                             rank_cells, select_genes, steps_per_epoch)
from ricefm.binning import bin_cells
from ricefm.shards.reader import CellBatch

TOK = TokenSpec(pad_id=120, cls_id=121, pad_value=-2.0)


def cells_from_counts(raw, col_gene_ids, modality):
    m = sp.csr_matrix(raw)
    return CellBatch(indices=np.arange(raw.shape[0]), lengths=np.diff(m.indptr).astype(np.int64),
                     modality=np.asarray(modality, np.int8),
                     arrays={"gene_ids": col_gene_ids[m.indices].astype(np.int32),
                             "bins": bin_cells(m.indptr, m.data), "values": m.data})


def test_whole_cell_batch_equals_published_inference_input(reference):
    cells = cells_from_counts(reference["in/raw_counts"], reference["in/raw_col_gene_ids"], reference["in/mod_types"])
    b = collate_pcpt(cells, TOK, max_seq_len=10_000, selection="first")
    for ours, theirs in [("gene_ids", "gene_ids"), ("values", "values"), ("key_padding_mask", "key_padding_mask"),
                         ("mod_types", "mod_types")]:
        np.testing.assert_array_equal(b[ours], reference[f"infer_in/{theirs}"])
    assert b["values"][:, 0].tolist() == [-2.0] * 8  # <cls> carries pad_value


@pytest.mark.parametrize("name,max_len", [("full", 128), ("trunc64", 64)])
def test_unsplit_collator_equals_published(binning_ref, name, max_len):
    cells = cells_from_counts(binning_ref["raw_counts"], binning_ref["gene_ids"], binning_ref["collate_mod_types"])
    b = collate_pcpt(cells, TOK, max_seq_len=max_len, selection="first")
    np.testing.assert_array_equal(b["gene_ids"], binning_ref[f"collate_{name}_genes"])
    np.testing.assert_array_equal(b["values"], binning_ref[f"collate_{name}_values"])


def test_generative_split_matches_published_shapes_counts_and_values(binning_ref):
    raw = binning_ref["raw_counts"]
    cells = cells_from_counts(raw, binning_ref["gene_ids"], binning_ref["collate_mod_types"])
    b = collate_generative(cells, TOK, max_seq_len=64, gen_ratio=0.5, seed=0, epoch=0)
    ref_p, ref_g = binning_ref["collate_split_pcpt_genes"], binning_ref["collate_split_gen_genes"]
    assert b["pcpt_gene_ids"].shape == ref_p.shape == (20, 33) and b["gen_gene_ids"].shape == ref_g.shape == (20, 31)
    np.testing.assert_array_equal((b["pcpt_gene_ids"] != 120).sum(1), (ref_p != 120).sum(1))
    np.testing.assert_array_equal((b["gen_gene_ids"] != 120).sum(1), (ref_g != 120).sum(1))
    bins = binning_ref["pretrain_binned"]
    for i in range(20):
        p = b["pcpt_gene_ids"][i][~b["pcpt_key_padding_mask"][i]]
        g = b["gen_gene_ids"][i][~b["gen_key_padding_mask"][i]]
        assert p[0] == 121 and not set(p[1:]) & set(g)  # <cls> first; a gene is in one stream only
        assert set(p[1:]) | set(g) <= set(np.flatnonzero(raw[i] > 0))  # gene id j is column j here
        np.testing.assert_array_equal(b["pcpt_values"][i][1:len(p)], bins[i][p[1:]])
        np.testing.assert_array_equal(b["gen_target_values"][i][:len(g)], bins[i][g])
    assert (b["gen_target_values"][b["gen_key_padding_mask"]] == -2).all()
    assert (b["pcpt_values"][:, 0] == -2).all()


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_generative_lengths_follow_ratio(binning_ref, ratio):
    cells = cells_from_counts(binning_ref["raw_counts"][:2], binning_ref["gene_ids"], [0, 1])  # 1 and 2 genes
    b = collate_generative(cells, TOK, max_seq_len=64, gen_ratio=ratio, seed=1, epoch=0)
    L = 3  # longest cell (2 genes) + <cls>
    assert b["gen_gene_ids"].shape[1] == int((L - 1) * ratio)
    assert b["pcpt_gene_ids"].shape[1] == L - int((L - 1) * ratio)


def test_select_genes_highest_is_deterministic_and_keeps_order():
    vals = np.float32([3, 9, 1, 9, 5])
    np.testing.assert_array_equal(select_genes(vals, 3, "highest"), [1, 3, 4])
    np.testing.assert_array_equal(select_genes(vals, 2, "first"), [0, 1])
    r = select_genes(vals, 3, "random", np.random.default_rng(0))
    assert len(set(r)) == 3 and list(r) == sorted(r)
    np.testing.assert_array_equal(select_genes(vals, 9, "highest"), np.arange(5))


def test_epoch_order_is_pure_function_of_seed_and_epoch():
    a, b = epoch_order(1000, 3, 7), epoch_order(1000, 3, 7)
    np.testing.assert_array_equal(a, b)
    assert sorted(a) == list(range(1000))
    assert not np.array_equal(a, epoch_order(1000, 3, 8)) and not np.array_equal(a, epoch_order(1000, 4, 7))


@pytest.mark.parametrize("n,world", [(1000, 1), (1003, 2), (1001, 4), (7, 3)])
def test_rank_shares_disjoint_and_complete(n, world):
    order = epoch_order(n, 0, 0)
    shares = [rank_cells(order, r, world) for r in range(world)]
    allc = np.concatenate(shares)
    assert len(allc) == n and len(np.unique(allc)) == n
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_steps_per_epoch_equal_on_all_ranks():
    assert steps_per_epoch(1003, 10, 2) == 50
    assert steps_per_epoch(1003, 10, 2, drop_last=False) == 51
    batches = [batch_cells(1003, 0, 0, s, 10, r, 2) for r in range(2) for s in range(50)]
    assert len(np.unique(np.concatenate(batches))) == 1000


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    from ricefm.shards import ShardedCells
    from ricefm.shards.build import BuildOptions, build_dataset
    from conftest import REPO

    out = tmp_path_factory.mktemp("demo") / "data"
    build_dataset([REPO / "ricefm/resources/rice_root_SRP309176_2k.h5ad"], out,
                  options=BuildOptions(cells_per_shard=700), progress=False)
    return ShardedCells(out)


def _stream(ds, **kw):
    tok = TokenSpec(pad_id=ds.vocab.pad_id, cls_id=ds.vocab.cls_id)
    return BatchStream(ds, tok, batch_size=32, max_seq_len=200, gen_ratios=(0.25, 0.5, 0.75), seed=5, **kw)


def test_stream_resumes_exactly_at_any_step(demo_dataset):
    full = list(_stream(demo_dataset, n_epochs=2))
    spe = _stream(demo_dataset).steps_in_epoch(0)
    assert spe == 2000 // 32 and len(full) == 2 * spe
    resumed = list(_stream(demo_dataset, n_epochs=2, start_epoch=1, start_step=17))
    assert len(resumed) == spe - 17
    for a, b in zip(full[spe + 17:], resumed):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    ratios = {float(b["gen_prob"]) for b in full}
    assert ratios == {0.25, 0.5, 0.75}
    epoch0 = np.concatenate([b["cell_index"] for b in full[:spe]])
    assert len(np.unique(epoch0)) == len(epoch0) == spe * 32


def test_stream_ranks_read_disjoint_cells(demo_dataset):
    seen = [np.concatenate([b["cell_index"] for b in _stream(demo_dataset, n_epochs=1, rank=r, world_size=2)])
            for r in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == (1000 // 32) * 32


def test_stream_batches_hold_stored_bins(demo_dataset):
    b = next(iter(_stream(demo_dataset, n_epochs=1, prefetch=0)))
    cells = demo_dataset.read(b["cell_index"])
    for i in range(len(b["cell_index"])):
        lookup = dict(zip(cells.cell(i, "gene_ids").tolist(), cells.cell(i, "bins").tolist()))
        m = ~b["pcpt_key_padding_mask"][i]
        m[0] = False
        assert [lookup[g] for g in b["pcpt_gene_ids"][i][m]] == b["pcpt_values"][i][m].tolist()
        g = ~b["gen_key_padding_mask"][i]
        assert [lookup[x] for x in b["gen_gene_ids"][i][g]] == b["gen_target_values"][i][g].tolist()
    assert b["pcpt_gene_ids"].shape[1] + b["gen_gene_ids"].shape[1] == 200


@pytest.mark.parametrize("block", [1, 64])
def test_worker_processes_give_the_identical_stream(demo_dataset, block):
    a = list(_stream(demo_dataset, n_epochs=1, start_step=50, read_block_cells=block))
    b = list(_stream(demo_dataset, n_epochs=1, start_step=50, num_workers=2, read_block_cells=block))
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_abandoned_stream_exits_cleanly(demo_dataset):
    import subprocess
    import sys
    code = ("import sys; from ricefm.shards import ShardedCells; from ricefm.batching import BatchStream, TokenSpec; "
            "ds = ShardedCells(sys.argv[1]); it = iter(BatchStream(ds, TokenSpec(ds.vocab.pad_id, ds.vocab.cls_id), "
            "16, 300, (0.5,), seed=0, prefetch=8)); next(it); print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(demo_dataset.directory)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_split_of_a_cell_does_not_depend_on_its_batch_or_rank(demo_dataset):
    tok = TokenSpec(pad_id=demo_dataset.vocab.pad_id, cls_id=demo_dataset.vocab.cls_id)
    both = collate_generative(demo_dataset.read([10, 20, 30, 40]), tok, 10_000, 0.5, seed=3, epoch=1)
    alone = collate_generative(demo_dataset.read([30]), tok, 10_000, 0.5, seed=3, epoch=1)
    n = int((~alone["gen_key_padding_mask"][0]).sum())
    np.testing.assert_array_equal(both["gen_gene_ids"][2][:n], alone["gen_gene_ids"][0][:n])
    other_epoch = collate_generative(demo_dataset.read([30]), tok, 10_000, 0.5, seed=3, epoch=2)
    assert not np.array_equal(other_epoch["gen_gene_ids"], alone["gen_gene_ids"])


def test_two_ranks_see_the_global_batch_of_one_process(demo_dataset):
    one = next(iter(_stream(demo_dataset, n_epochs=1, prefetch=0)))
    tok = TokenSpec(pad_id=demo_dataset.vocab.pad_id, cls_id=demo_dataset.vocab.cls_id)
    halves = [BatchStream(demo_dataset, tok, batch_size=16, max_seq_len=200, gen_ratios=(0.25, 0.5, 0.75), seed=5,
                          rank=r, world_size=2, prefetch=0).batch(0, 0) for r in range(2)]
    got = {int(c): (tuple(g), tuple(p)) for h in halves for c, g, p in
           zip(h["cell_index"], h["gen_gene_ids"], h["pcpt_gene_ids"])}
    want = {int(c): (tuple(g), tuple(p)) for c, g, p in zip(one["cell_index"], one["gen_gene_ids"], one["pcpt_gene_ids"])}
    assert got == want  # same cells, same split, same padding length (all cells are longer than 200)


@pytest.mark.parametrize("max_seq_len,ratio", [(64, 0.5), (16, 0.25), (16, 0.75), (8, 0.0), (1200, 0.99)])
def test_generative_split_is_the_ranks_of_the_cell_keys(max_seq_len, ratio):
    """The split's definition, so that batches stay the same across versions (resume relies on it):
    ranking a cell's keys, gen takes ranks [0, min(n_gen, gen_len)), pcpt ranks
    [n_gen, n_gen + min(n - n_gen, pcpt_len - 1)), each in stored order."""
    from ricefm.batching import _cell_random_keys

    rng = np.random.default_rng(7)
    lengths = np.array([0, 1, 2, 5, 9, 30, 100, 3], np.int64)
    genes = rng.permutation(5000)[:lengths.sum()].astype(np.int32)  # distinct ids: positions are recoverable
    cells = CellBatch(indices=np.arange(40, 48), lengths=lengths, modality=np.zeros(8, np.int8),
                      arrays={"gene_ids": genes, "bins": rng.integers(1, 51, lengths.sum()).astype(np.uint8)})
    b = collate_generative(cells, TOK, max_seq_len, ratio, seed=3, epoch=2)
    keys = _cell_random_keys(3, 2, cells)
    gen_len, pcpt_len = b["gen_gene_ids"].shape[1], b["pcpt_gene_ids"].shape[1]
    for i, (n, start) in enumerate(zip(lengths, np.concatenate([[0], np.cumsum(lengths)[:-1]]))):
        rank_order = np.argsort(keys[start:start + n])
        n_gen = int(n * ratio)
        want_gen = genes[start + np.sort(rank_order[:min(n_gen, gen_len)])]
        want_pcpt = genes[start + np.sort(rank_order[n_gen:n_gen + min(n - n_gen, pcpt_len - 1)])]
        np.testing.assert_array_equal(b["gen_gene_ids"][i][~b["gen_key_padding_mask"][i]], want_gen)
        np.testing.assert_array_equal(b["pcpt_gene_ids"][i][1:][~b["pcpt_key_padding_mask"][i][1:]], want_pcpt)


def test_bucketed_order_is_a_length_sorted_regrouping_of_the_epoch_order():
    from ricefm.batching import bucketed_order

    rng = np.random.default_rng(0)
    lengths = rng.integers(200, 1600, 1000)
    a = bucketed_order(lengths, seed=3, epoch=1, global_batch=16, window_batches=8)
    assert np.array_equal(a, bucketed_order(lengths, seed=3, epoch=1, global_batch=16, window_batches=8))  # pure
    assert sorted(a) == list(range(1000))  # every cell once
    assert not np.array_equal(a, bucketed_order(lengths, seed=3, epoch=2, global_batch=16, window_batches=8))
    order = epoch_order(1000, 3, 1)
    for w in range(0, 1000, 128):  # each window holds the same cells as the epoch order's window
        assert set(a[w:w + 128]) == set(order[w:w + 128])
    batches = a[:62 * 16].reshape(62, 16)
    spread = np.ptp(lengths[batches], axis=1)
    assert spread.mean() < 0.15 * np.ptp(lengths)  # similar lengths within a batch
    assert not np.all(np.diff(lengths[batches].mean(1)) >= 0)  # but batches are not in length order
    assert list(a[992:]) == sorted(a[992:], key=lambda c: (lengths[c], list(order[896:]).index(c)))  # partial last


def test_bucketed_stream_pads_little_keeps_every_token_and_splits_ranks_like_one_process(demo_dataset):
    from ricefm.batching import bucket_length

    lengths = demo_dataset.lengths()
    assert len(lengths) == 2000 and lengths.min() > 0
    tok = TokenSpec(pad_id=demo_dataset.vocab.pad_id, cls_id=demo_dataset.vocab.cls_id)

    def padding(batching):
        stream = BatchStream(demo_dataset, tok, batch_size=8, max_seq_len=1200, gen_ratios=(0.25, 0.5, 0.75),
                             seed=5, n_epochs=1, batching=batching)
        real = total = 0
        for b in stream:
            masks = (b["pcpt_key_padding_mask"], b["gen_key_padding_mask"])
            real += sum(int((~m).sum()) for m in masks)
            total += sum(m.size for m in masks)
            if batching == "bucketed":
                width = b["pcpt_gene_ids"].shape[1] + b["gen_gene_ids"].shape[1]
                assert width == 1200 or width % 64 == 0
        return 1 - real / total, real

    bucketed, real_b = padding("bucketed")
    published, real_p = padding("published")
    assert bucketed < 0.10 < 0.3 < published  # measured: see README (Throughput)
    assert bucket_length(1, 1200) == 64 and bucket_length(1150, 1200) == 1152 and bucket_length(1190, 1200) == 1200
    print(f"padding over an epoch of the shipped cells at 1,200 tokens: bucketed {bucketed:.3f}, published {published:.3f}")
    one = BatchStream(demo_dataset, tok, 16, 1200, (0.5,), seed=5, batching="bucketed", prefetch=0).batch(0, 3)
    halves = [BatchStream(demo_dataset, tok, 8, 1200, (0.5,), seed=5, rank=r, world_size=2, batching="bucketed",
                          prefetch=0).batch(0, 3) for r in range(2)]
    got = {int(c): tuple(g[~m]) for h in halves for c, g, m in
           zip(h["cell_index"], h["gen_gene_ids"], h["gen_key_padding_mask"])}
    want = {int(c): tuple(g[~m]) for c, g, m in zip(one["cell_index"], one["gen_gene_ids"], one["gen_key_padding_mask"])}
    assert got == want  # the global batch of one process, split between two ranks, same gen tokens


def test_bucketed_micro_batches_of_one_step_are_the_cells_of_the_larger_batch(demo_dataset):
    tok = TokenSpec(pad_id=demo_dataset.vocab.pad_id, cls_id=demo_dataset.vocab.cls_id)
    large = BatchStream(demo_dataset, tok, 16, 1200, (0.5,), seed=5, batching="bucketed", prefetch=0)
    micro = BatchStream(demo_dataset, tok, 8, 1200, (0.5,), seed=5, batching="bucketed", prefetch=0, accum=2)
    for step in (0, 7, 30):
        cells = np.concatenate([micro.batch(0, 2 * step + m)["cell_index"] for m in range(2)])
        assert sorted(cells) == sorted(large.batch(0, step)["cell_index"])
    with pytest.raises(ValueError, match="batching 'sorted' is not one of"):
        BatchStream(demo_dataset, tok, 8, 1200, (0.5,), seed=5, batching="sorted")


def test_token_budget_batches_fill_the_budget_with_one_size_per_length():
    from ricefm.batching import bucket_length, token_budget_batches

    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(500), 0.6, 3000), 20, 3000).astype(np.int64)
    args = dict(tokens_per_batch=4800, devices=2, max_seq_len=1200, length_step=64)
    batches = token_budget_batches(lengths, 3, 1, **args)
    again = token_budget_batches(lengths, 3, 1, **args)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again)) and len(batches) == len(again)  # pure
    cells = np.concatenate(batches)
    assert len(set(cells.tolist())) == len(cells)  # no cell twice
    width = 32 * 2 * 4  # window: 32 batches of the full-length size (2 devices x 4800 // 1200)
    assert len(lengths) - len(cells) < width  # only the last window's leftover is out of the epoch
    sizes = {}
    for b in batches:
        L = bucket_length(min(int(lengths[b].max()) + 1, 1200), 1200)
        assert len(b) == 2 * (4800 // L) and len(b) * L <= 2 * 4800  # the budget, split evenly over devices
        sizes.setdefault(L, set()).add(len(b))
    assert all(len(s) == 1 for s in sizes.values()) and len(sizes) <= 19  # one batch size per bucket length
    assert max(len(b) for b in batches) > 4 * min(len(b) for b in batches)  # short cells ride in big batches
    other = token_budget_batches(lengths, 3, 2, **args)
    assert not np.array_equal(np.concatenate(other)[:100], cells[:100])  # another epoch, another order
    with pytest.raises(ValueError, match="below max_seq_len"):
        token_budget_batches(lengths, 3, 1, tokens_per_batch=1000, devices=1, max_seq_len=1200)


def test_token_budget_stream_pads_little_and_two_ranks_are_one_process(demo_dataset):
    tok = TokenSpec(pad_id=demo_dataset.vocab.pad_id, cls_id=demo_dataset.vocab.cls_id)

    def stream(**kw):
        kw.setdefault("tokens_per_batch", 9600)
        return BatchStream(demo_dataset, tok, 8, 1200, (0.25, 0.5, 0.75), seed=5, batching="bucketed", prefetch=0,
                           **kw)

    one = stream()
    steps = one.steps_in_epoch(0)
    real = total = 0
    seen = []
    for s in range(steps):
        b = one.batch(0, s)
        width = b["pcpt_gene_ids"].shape[1] + b["gen_gene_ids"].shape[1]
        assert len(b["cell_index"]) * width <= 9600
        masks = (b["pcpt_key_padding_mask"], b["gen_key_padding_mask"])
        real += sum(int((~m).sum()) for m in masks)
        total += sum(m.size for m in masks)
        seen += b["cell_index"].tolist()
    assert real / total > 0.9 and len(seen) == len(set(seen)) > 1700
    # 2 ranks with half the budget each = 1 process: same steps, disjoint halves of each global batch
    halves = [stream(tokens_per_batch=9600, rank=r, world_size=2) for r in range(2)]
    assert [h.steps_in_epoch(1) for h in halves] == [stream(tokens_per_batch=9600, devices_per_rank=2)
                                                    .steps_in_epoch(1)] * 2
    double = stream(tokens_per_batch=9600, devices_per_rank=2)
    for s in (0, 5, halves[0].steps_in_epoch(1) - 1):
        parts = [h.batch(1, s)["cell_index"] for h in halves]
        assert len(parts[0]) == len(parts[1]) and not set(parts[0]) & set(parts[1])
        assert sorted(np.concatenate(parts)) == sorted(double.batch(1, s)["cell_index"])
    resumed = list(stream(n_epochs=1, start_step=steps - 3))
    for a, s in zip(resumed, range(steps - 3, steps)):
        np.testing.assert_array_equal(a["gen_gene_ids"], one.batch(0, s)["gen_gene_ids"])
    with pytest.raises(ValueError, match="needs batching='bucketed'"):
        BatchStream(demo_dataset, tok, 8, 1200, (0.5,), seed=5, tokens_per_batch=9600)


def test_block_order_permutes_runs_of_stored_cells_and_block_one_is_the_cell_order():
    np.testing.assert_array_equal(epoch_order(1003, 3, 2, block=1), epoch_order(1003, 3, 2))
    order = epoch_order(1003, 3, 2, block=64)
    assert sorted(order.tolist()) == list(range(1003))  # every cell once
    where = np.argsort(order)  # the position of each cell in the order
    for start in range(0, 1003, 64):  # each block of 64 stored cells sits in the order as one run, in stored order
        assert np.all(np.diff(where[start:start + 64]) == 1)
    assert len(np.flatnonzero(np.diff(order) != 1)) >= 10  # and the 16 runs are shuffled
    np.testing.assert_array_equal(order, epoch_order(1003, 3, 2, block=64))  # pure function of (seed, epoch)
    assert not np.array_equal(order, epoch_order(1003, 3, 3, block=64))


@pytest.mark.parametrize("kw", [dict(batching="bucketed"), dict(batching="published"),
                                dict(batching="bucketed", tokens_per_batch=2400)])
def test_group_reads_give_the_batches_of_direct_reads_and_few_reads(demo_dataset, kw):
    """With read_block_cells the rank reads 32 steps' cells at once; each batch is still exactly the
    collation of its own cells, the stream resumes exactly, and reads drop to one per group."""
    calls = []
    real = demo_dataset.read_async

    def counting(indices, *a, **k):
        calls.append(len(indices))
        return real(indices, *a, **k)

    demo_dataset.read_async = counting
    try:
        stream = _stream(demo_dataset, n_epochs=1, read_block_cells=64, **kw)
        steps = stream.steps_in_epoch(0)
        got = list(stream)
        assert len(calls) == -(-steps // 32) and sum(calls) == sum(len(b["cell_index"]) for b in got)
        direct = _stream(demo_dataset, n_epochs=1, read_block_cells=64, prefetch=0, **kw)
        direct.group_reads = False  # one read per batch: the reference
        resumed = list(_stream(demo_dataset, n_epochs=1, read_block_cells=64, start_step=steps - 20, **kw))
    finally:
        demo_dataset.read_async = real
    for s, b in enumerate(got):
        ref = direct.batch(0, s)
        for k in ref:
            np.testing.assert_array_equal(b[k], ref[k])
    for a, b in zip(got[-20:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    cells = np.concatenate([b["cell_index"] for b in got])
    assert len(np.unique(cells)) == len(cells)
    # the cells read together lie in runs of stored cells: 32 steps x 32 cells = 1,024 cells in ~16 runs of 64
    first_group = np.sort(np.concatenate([b["cell_index"] for b in got[:32]]))
    runs = 1 + int(np.sum(np.diff(first_group) != 1))
    assert runs <= len(first_group) // 64 + 2, runs
