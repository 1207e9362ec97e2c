"""Cells -> NumPy batch dicts in the published riceFM layouts, plus the epoch/rank/step plan.

Every batch is a pure function of (seed, epoch, step, rank): the epoch order comes from
(seed, epoch), a rank takes every ``world_size``-th cell of it, the gen ratio comes from
(seed, epoch, step) and a cell's pcpt/gen split and sub-sampling from (seed, epoch, cell).
Training can therefore resume at any step and see exactly the batches it would have seen, and
N ranks see exactly the cells and splits of one process with an N-times larger batch.
"""

from __future__ import annotations

import atexit
import collections
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ricefm.shards.reader import CellBatch, PendingRead, ShardedCells

SELECTIONS = ("highest", "first", "random")
# the keys of a pcpt-only batch (embedding, fine-tuning, annotation) a model's forward takes
PCPT_INPUTS = ("gene_ids", "values", "key_padding_mask", "mod_types")
# the keys of a generative batch a model's forward takes (the rest are targets and bookkeeping)
GENERATIVE_INPUTS = ("pcpt_gene_ids", "pcpt_values", "pcpt_key_padding_mask", "mod_types",
                     "gen_gene_ids", "gen_key_padding_mask")


@dataclass(frozen=True)
class TokenSpec:
    """The token ids and values every batch layout needs."""

    pad_id: int
    cls_id: int
    pad_value: float = -2.0


def epoch_order(n_cells: int, seed: int, epoch: int, block: int = 1) -> np.ndarray:
    """A permutation of all cells that depends only on (seed, epoch).

    ``block > 1`` (``data.read_block_cells``) permutes runs of ``block`` consecutive cells instead,
    each run kept in stored order: the cells a rank reads together then lie in a few places of a
    shard, which an object store serves in a few large requests instead of one or two per cell.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x0E70C]))
    if block <= 1:
        return rng.permutation(n_cells)
    runs = rng.permutation(-(-n_cells // block))
    order = (runs[:, None] * block + np.arange(block)).ravel()
    return order[order < n_cells]


def rank_cells(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's share of an epoch order: disjoint across ranks, together all cells."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return order[rank::world_size]


def steps_per_epoch(n_cells: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Batches per rank per epoch; the same on every rank so data-parallel steps stay in lockstep."""
    if drop_last:
        return (n_cells // world_size) // batch_size
    largest_rank = -(-n_cells // world_size)
    return -(-largest_rank // batch_size)


BATCHING = ("bucketed", "published")
WINDOW_BATCHES = 32  # global batches per shuffle window of the bucketed order
READ_GROUP_STEPS = 32  # with read_block_cells > 1 a rank reads the cells of this many steps at once
LENGTH_STEP = 64  # bucketed batch lengths are multiples of this (or max_seq_len): data.length_step


def bucketed_order(lengths: np.ndarray, seed: int, epoch: int, global_batch: int,
                   window_batches: int = WINDOW_BATCHES, block: int = 1) -> np.ndarray:
    """The epoch order regrouped so that each global batch holds cells of similar length.

    The (seed, epoch) permutation is cut into windows of ``window_batches`` global batches; within
    a window cells are sorted by length (ties keep the permutation's order) and cut into batches,
    whose order inside the window is shuffled by (seed, epoch, window). So every cell is still
    used once per epoch, batches still mix cells from all over the data, and the whole order is a
    pure function of (lengths, seed, epoch, global batch). A partial last batch stays last.
    ``block``: see :func:`epoch_order` (a window of 32 global batches of 64 then holds 32 runs).
    """
    order = epoch_order(len(lengths), seed, epoch, block)
    width = global_batch * window_batches
    out = []
    for w, start in enumerate(range(0, len(order), width)):
        window = order[start:start + width]
        window = window[np.argsort(lengths[window], kind="stable")]
        full = len(window) // global_batch
        batches = window[:full * global_batch].reshape(full, global_batch)
        out.append(batches[_rng(seed, epoch, w, 0xB0C7).permutation(full)].ravel())
        out.append(window[full * global_batch:])
    return np.concatenate(out) if out else order


def bucket_length(length: int, max_seq_len: int, step: int = LENGTH_STEP) -> int:
    """The padded length of a bucketed batch whose longest cell needs ``length`` tokens: the next
    multiple of ``step``, at most ``max_seq_len``; so a compiled step sees ceil(max_seq_len / step)
    lengths at most (19 at 1,200 tokens), each with one program per gen ratio."""
    return int(min(max_seq_len, -(-int(length) // step) * step))


def token_budget_batches(lengths: np.ndarray, seed: int, epoch: int, tokens_per_batch: int, devices: int,
                         max_seq_len: int, length_step: int = LENGTH_STEP,
                         window_batches: int = WINDOW_BATCHES, block: int = 1) -> list[np.ndarray]:
    """The global micro-batches of one epoch under a token budget (``data.tokens_per_batch``).

    A batch whose longest cell pads to L tokens (``bucket_length``) holds ``tokens_per_batch // L``
    cells per device (``devices`` in all ranks), so every batch computes about the same number of
    token positions and each length has one batch size (one compiled program per length and gen
    ratio, as without a budget). The (seed, epoch) permutation is cut into windows; a window's cells, with the cells
    left over from the previous window, are sorted by length and cut into batches from the longest
    end; the few shortest cells that do not fill a batch move on to the next window (those of the
    last window are left out of this epoch); batches are shuffled within their window. A pure
    function of its arguments; rank r of W takes cells r, r + W, ... of each batch. ``block``:
    see :func:`epoch_order`.
    """
    if tokens_per_batch < max_seq_len:
        raise ValueError(f"tokens_per_batch {tokens_per_batch} is below max_seq_len {max_seq_len}: a full-length "
                         "cell would not fit")
    tokens = np.minimum(np.asarray(lengths, np.int64) + 1, max_seq_len)

    def cells_per_batch(length: int) -> int:
        return devices * (tokens_per_batch // bucket_length(length, max_seq_len, length_step))

    order = epoch_order(len(tokens), seed, epoch, block)
    width = window_batches * cells_per_batch(max_seq_len)
    batches, carry = [], np.zeros(0, np.int64)
    for w, start in enumerate(range(0, len(order), width)):
        window = np.concatenate([carry, order[start:start + width]])
        window = window[np.argsort(tokens[window], kind="stable")]
        cut, hi = [], len(window)
        while hi > 0 and (n := cells_per_batch(int(tokens[window[hi - 1]]))) <= hi:
            cut.append(window[hi - n:hi])
            hi -= n
        carry = window[:hi]
        batches += [cut[i] for i in _rng(seed, epoch, w, 0x70B5).permutation(len(cut))]
    return batches


def batch_cells(n_cells: int, seed: int, epoch: int, step: int, batch_size: int,
                rank: int = 0, world_size: int = 1) -> np.ndarray:
    mine = rank_cells(epoch_order(n_cells, seed, epoch), rank, world_size)
    return mine[step * batch_size:(step + 1) * batch_size]


def split_cells(n_cells: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation cell indices (sorted), a pure function of (n_cells, fraction, seed)."""
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5B117])).permutation(n_cells)
    n_valid = int(round(n_cells * valid_fraction))
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB),
        np.uint64(0xD6E8FEB86659FD93))


def _cell_random_keys(seed: int, epoch: int, cells: CellBatch) -> np.ndarray:
    """A uint64 per stored gene, a hash (splitmix64) of (seed, epoch, cell index, position).

    Sorting a cell's keys gives a uniformly random permutation that depends on the cell, not
    on which batch or rank it landed in: a data-parallel run splits every cell exactly as a
    single process with the same global batch does.
    """
    n = int(cells.lengths.sum())
    cell = np.repeat(cells.indices.astype(np.uint64), cells.lengths)
    pos = (np.arange(n, dtype=np.int64) - np.repeat(cells.starts, cells.lengths)).astype(np.uint64)
    base = np.array([seed, epoch], dtype=np.uint64) * np.array([_MIX[0], _MIX[3]])  # arrays wrap silently
    x = base[0] ^ base[1] ^ (cell * _MIX[1]) ^ (pos * _MIX[2])
    x ^= x >> np.uint64(30)
    x *= _MIX[1]
    x ^= x >> np.uint64(27)
    x *= _MIX[2]
    x ^= x >> np.uint64(31)
    return x


def collate_generative(cells: CellBatch, tokens: TokenSpec, max_seq_len: int, gen_ratio: float,
                       seed: int, epoch: int) -> dict[str, np.ndarray]:
    """The published "both" layout: a perceptual stream (<cls> + genes with their bins) and a
    generative stream (gene ids only; their bins are the targets).

    L = min(max_seq_len, longest <cls>+genes); gen_len = int((L-1) r), pcpt_len = L - gen_len.
    A cell's genes are split at random, int(n r) to gen and the rest to pcpt; a part longer
    than its length is sub-sampled at random (pcpt keeps <cls>); genes keep their stored order.
    The randomness of a cell is a function of (seed, epoch, cell index) only.
    """
    n_cells = len(cells.lengths)
    L = int(min(max_seq_len, int(cells.lengths.max(initial=0)) + 1))
    gen_len = int((L - 1) * gen_ratio)
    pcpt_len = L - gen_len
    pcpt_ids = np.full((n_cells, pcpt_len), tokens.pad_id, np.int64)
    pcpt_vals = np.full((n_cells, pcpt_len), tokens.pad_value, np.float32)
    gen_ids = np.full((n_cells, gen_len), tokens.pad_id, np.int64)
    gen_vals = np.full((n_cells, gen_len), tokens.pad_value, np.float32)
    pcpt_ids[:, 0] = tokens.cls_id
    all_genes, all_bins = cells.arrays["gene_ids"], cells.arrays["bins"]
    keys = _cell_random_keys(seed, epoch, cells)
    ends = np.cumsum(cells.lengths).tolist()
    for i, (n, end) in enumerate(zip(cells.lengths.tolist(), ends)):
        genes, bins = all_genes[end - n:end], all_bins[end - n:end]
        n_gen = int(n * gen_ratio)
        n_gen_kept, n_pcpt_kept = min(n_gen, gen_len), min(n - n_gen, pcpt_len - 1)
        # ranks of the cell's keys are a uniformly random permutation; gen gets ranks
        # [0, n_gen_kept), pcpt ranks [n_gen, n_gen + n_pcpt_kept): the split and the sub-sampling
        # of a too-long part come from the same draw. Only these rank sets matter, so a partial
        # sort at their boundaries replaces a full argsort; stored order is kept.
        cuts = sorted({c for c in (n_gen_kept, n_gen, n_gen + n_pcpt_kept) if 0 < c < n})
        by_rank = np.argpartition(keys[end - n:end], cuts) if cuts else np.arange(n)
        part = np.zeros(n, np.int8)
        part[by_rank[:n_gen_kept]] = 1
        part[by_rank[n_gen:n_gen + n_pcpt_kept]] = 2
        gen_sel, pcpt_sel = np.flatnonzero(part == 1), np.flatnonzero(part == 2)
        gen_ids[i, :len(gen_sel)] = genes[gen_sel]
        gen_vals[i, :len(gen_sel)] = bins[gen_sel]
        pcpt_ids[i, 1:1 + len(pcpt_sel)] = genes[pcpt_sel]
        pcpt_vals[i, 1:1 + len(pcpt_sel)] = bins[pcpt_sel]
    return {
        "pcpt_gene_ids": pcpt_ids, "pcpt_values": pcpt_vals, "pcpt_key_padding_mask": pcpt_ids == tokens.pad_id,
        "gen_gene_ids": gen_ids, "gen_target_values": gen_vals, "gen_key_padding_mask": gen_ids == tokens.pad_id,
        "mod_types": cells.modality.astype(np.int64), "gen_prob": np.float32(gen_ratio),
        "cell_index": cells.indices.astype(np.int64),
    }


def pad_generative(batch: dict[str, np.ndarray], max_seq_len: int, tokens: TokenSpec) -> dict[str, np.ndarray]:
    """Pad a generative batch to the lengths it would have if its longest cell filled ``max_seq_len``
    tokens (the config's, or a bucket length at most that).

    Every token stays (the split never drops more genes at the longer lengths), so the loss is
    unchanged, and a compiled step sees one shape per gen ratio and length instead of one per batch.
    """
    r = float(batch["gen_prob"])
    gen_len = int((max_seq_len - 1) * r)
    pcpt_len = max_seq_len - gen_len
    out = dict(batch)
    for stream, length in (("pcpt", pcpt_len), ("gen", gen_len)):
        ids = batch[f"{stream}_gene_ids"]
        extra = length - ids.shape[1]
        if extra < 0:
            raise ValueError(f"{stream} stream is longer ({ids.shape[1]}) than max_seq_len allows ({length})")
        values_key = "pcpt_values" if stream == "pcpt" else "gen_target_values"
        out[f"{stream}_gene_ids"] = np.pad(ids, ((0, 0), (0, extra)), constant_values=tokens.pad_id)
        out[values_key] = np.pad(batch[values_key], ((0, 0), (0, extra)), constant_values=tokens.pad_value)
        out[f"{stream}_key_padding_mask"] = np.pad(batch[f"{stream}_key_padding_mask"], ((0, 0), (0, extra)),
                                                   constant_values=True)
    return out


def select_genes(values: np.ndarray, k: int, selection: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Positions of at most k genes to keep, in stored order.

    ``highest``: largest values first, ties by stored order (deterministic, for embeddings);
    ``first``: the first k in stored order (the published no-sampling collator);
    ``random``: a uniform random subset (needs ``rng``).
    """
    n = len(values)
    if n <= k:
        return np.arange(n)
    if selection == "highest":
        keep = np.argsort(-values.astype(np.float64), kind="stable")[:k]
    elif selection == "first":
        keep = np.arange(k)
    elif selection == "random":
        if rng is None:
            raise ValueError("selection='random' needs an rng")
        keep = rng.choice(n, k, replace=False)
    else:
        raise ValueError(f"selection {selection!r} is not one of {SELECTIONS}")
    return np.sort(keep)


def collate_pcpt(cells: CellBatch, tokens: TokenSpec, max_seq_len: int, selection: str = "highest",
                 rng: np.random.Generator | None = None, value_array: str = "bins") -> dict[str, np.ndarray]:
    """Perceptual-only layout for embeddings/inference: <cls> + the cell's genes, padded to
    min(max_seq_len, longest cell + 1); a longer cell keeps ``max_seq_len - 1`` genes by
    ``selection``, ranked by the raw ``values`` when the batch has them (finer than bins)."""
    n_cells = len(cells.lengths)
    L = int(min(max_seq_len, int(cells.lengths.max(initial=0)) + 1))
    ids = np.full((n_cells, L), tokens.pad_id, np.int64)
    vals = np.full((n_cells, L), tokens.pad_value, np.float32)
    ids[:, 0] = tokens.cls_id
    for i in range(n_cells):
        genes, values = cells.cell(i, "gene_ids"), cells.cell(i, value_array)
        rank_by = cells.cell(i, "values") if "values" in cells.arrays else values
        keep = select_genes(rank_by, L - 1, selection, rng)
        ids[i, 1:1 + len(keep)] = genes[keep]
        vals[i, 1:1 + len(keep)] = values[keep]
    return {"gene_ids": ids, "values": vals, "key_padding_mask": ids == tokens.pad_id,
            "mod_types": cells.modality.astype(np.int64), "cell_index": cells.indices.astype(np.int64)}


class BatchStream:
    """Generative training batches for one data-parallel rank, starting at any (epoch, step).

    With ``num_workers == 0`` a background thread reads (TensorStore releases the GIL) and
    collates, keeping ``prefetch`` batches ready. With ``num_workers > 0`` that many spawned
    processes each build whole batches; since a batch is a pure function of (epoch, step), they
    need no coordination and the stream is identical to the single-process one.
    """

    def __init__(self, dataset: ShardedCells, tokens: TokenSpec, batch_size: int, max_seq_len: int,
                 gen_ratios: Sequence[float], seed: int, rank: int = 0, world_size: int = 1,
                 start_epoch: int = 0, start_step: int = 0, n_epochs: int | None = None, prefetch: int = 4,
                 cells: np.ndarray | None = None, num_workers: int = 0, pad_to_max: bool = False,
                 batching: str = "published", length_step: int = LENGTH_STEP, accum: int = 1,
                 tokens_per_batch: int = 0, devices_per_rank: int = 1, read_block_cells: int = 1):
        if batching not in BATCHING:
            raise ValueError(f"batching {batching!r} is not one of {BATCHING}")
        if tokens_per_batch and batching != "bucketed":
            raise ValueError("tokens_per_batch needs batching='bucketed'")
        # > 0: batch_size gives way to a budget of token positions per device, each rank holding
        # devices_per_rank devices (a batch is split evenly over them)
        self.tokens_per_batch, self.devices_per_rank = int(tokens_per_batch), int(devices_per_rank)
        self.dataset, self.tokens, self.batching, self.length_step = dataset, tokens, batching, int(length_step)
        self.accum = int(accum)  # micro-batches per optimizer step: bucketed groups the cells of a whole step
        # > 1: the order permutes runs of this many stored cells, and the cells of READ_GROUP_STEPS steps
        # are read at once (few large requests on object stores); 1: one read per batch, cell by cell
        self.read_block_cells = max(1, int(read_block_cells))
        self.group_reads = self.read_block_cells > 1  # loader processes read per batch (each sees some steps only)
        self._groups: collections.OrderedDict = collections.OrderedDict()
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.gen_ratios = tuple(float(r) for r in gen_ratios)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_epoch, self.start_step, self.n_epochs = start_epoch, start_step, n_epochs
        self.prefetch, self.num_workers, self.pad_to_max = prefetch, num_workers, pad_to_max
        # a subset of the dataset (e.g. the training split); positions index into it
        self.cells = np.arange(len(dataset)) if cells is None else np.asarray(cells, np.int64)
        self._order_epoch, self._order, self._budget = -1, np.zeros(0, np.int64), []
        self._lengths = dataset.lengths()[self.cells] if batching == "bucketed" else None
        self._fixed_steps = steps_per_epoch(len(self.cells), batch_size, world_size)
        if self.steps_in_epoch(start_epoch) == 0:
            raise ValueError(f"{len(self.cells)} cells over {world_size} rank(s) make no batch of "
                             + (f"{self.tokens_per_batch} tokens" if self.tokens_per_batch else f"{batch_size}"))

    def steps_in_epoch(self, epoch: int) -> int:
        """Micro-batches per rank in ``epoch`` (the same on every rank; with a token budget it
        depends on how the epoch's cells fall into lengths)."""
        if not self.tokens_per_batch:
            return self._fixed_steps
        self._rank_order(epoch)
        return len(self._budget)

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """The batch at (epoch, step) for this rank; a pure function of its arguments."""
        return self._collate(epoch, step, self._read(epoch, step).result())

    def _rank_order(self, epoch: int) -> np.ndarray:
        # one permutation per epoch, not per batch (a 1M-cell permutation costs ~10 ms)
        if self._order_epoch != epoch:
            if self.tokens_per_batch:
                self._budget = [b[self.rank::self.world_size] for b in token_budget_batches(
                    self._lengths, self.seed, epoch, self.tokens_per_batch, self.world_size * self.devices_per_rank,
                    self.max_seq_len, self.length_step, block=self.read_block_cells)]
                order = np.zeros(0, np.int64)
            elif self.batching == "bucketed":
                order = bucketed_order(self._lengths, self.seed, epoch, self.batch_size * self.world_size * self.accum,
                                       block=self.read_block_cells)
            else:
                order = epoch_order(len(self.cells), self.seed, epoch, self.read_block_cells)
            self._order = rank_cells(order, self.rank, self.world_size)
            self._order_epoch = epoch
        return self._order

    def step_positions(self, epoch: int, step: int) -> np.ndarray:
        """This rank's cells at (epoch, step), as positions into ``cells``."""
        order = self._rank_order(epoch)
        return self._budget[step] if self.tokens_per_batch else order[step * self.batch_size:(step + 1) * self.batch_size]

    def _read(self, epoch: int, step: int, ahead: bool = True) -> PendingRead | RowsOf:
        if not self.group_reads:
            return self.dataset.read_async(self.cells[self.step_positions(epoch, step)])
        group = step // READ_GROUP_STEPS
        if (epoch, group) not in self._groups:
            first = group * READ_GROUP_STEPS
            parts = [self.step_positions(epoch, s)
                     for s in range(first, min(first + READ_GROUP_STEPS, self.steps_in_epoch(epoch)))]
            bounds = np.cumsum([0] + [len(p) for p in parts])
            self._groups[epoch, group] = (first, bounds, self.dataset.read_async(self.cells[np.concatenate(parts)]))
            while len(self._groups) > 3:  # batches already handed out keep their group's read alive
                self._groups.popitem(last=False)
            if ahead and first + READ_GROUP_STEPS < self.steps_in_epoch(epoch):  # the next group is in flight
                self._read(epoch, first + READ_GROUP_STEPS, ahead=False)
        first, bounds, pending = self._groups[epoch, group]
        return RowsOf(pending, int(bounds[step - first]), int(bounds[step - first + 1]))

    def _collate(self, epoch: int, step: int, cells: CellBatch) -> dict[str, np.ndarray]:
        ratio = self.gen_ratios[_rng(self.seed, epoch, step).integers(len(self.gen_ratios))]
        batch = collate_generative(cells, self.tokens, self.max_seq_len, ratio, self.seed, epoch)
        if self.batching == "bucketed":  # a few fixed lengths: little padding, few compiled shapes
            length = batch["pcpt_gene_ids"].shape[1] + batch["gen_gene_ids"].shape[1]
            batch = pad_generative(batch, bucket_length(length, self.max_seq_len, self.length_step), self.tokens)
        elif self.pad_to_max:  # static shapes for compiled (XLA) steps
            batch = pad_generative(batch, self.max_seq_len, self.tokens)
        batch["epoch"], batch["step"] = np.int64(epoch), np.int64(step)
        return batch

    def _positions(self) -> Iterator[tuple[int, int]]:
        epoch, step = self.start_epoch, self.start_step
        while self.n_epochs is None or epoch < self.n_epochs:
            while step < self.steps_in_epoch(epoch):
                yield epoch, step
                step += 1
            epoch, step = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.num_workers > 0:
            yield from self._iter_processes()
            return
        if self.prefetch <= 0:
            for epoch, step in self._positions():
                yield self.batch(epoch, step)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            # the reads of the next `prefetch` batches are in flight while one is collated
            pending: collections.deque = collections.deque()
            try:
                for epoch, step in self._positions():
                    pending.append((epoch, step, self._read(epoch, step)))
                    if len(pending) > self.prefetch:
                        e, s, read = pending.popleft()
                        if not put(self._collate(e, s, read.result())):
                            return
                while pending:
                    e, s, read = pending.popleft()
                    if not put(self._collate(e, s, read.result())):
                        return
                put(done)
            except BaseException as e:  # handed to the consumer, raised there
                put(e)
            finally:
                for _, _, read in pending:  # never leave TensorStore reads in flight behind us
                    read.result()

        t = threading.Thread(target=work, daemon=True, name="ricefm-batch-stream")

        def shutdown() -> None:
            stop.set()
            t.join()

        atexit.register(shutdown)  # an abandoned stream still stops cleanly at interpreter exit
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            shutdown()
            atexit.unregister(shutdown)

    def _iter_processes(self) -> Iterator[dict[str, np.ndarray]]:
        import multiprocessing as mp

        # spawn, not fork: TensorStore's thread pools do not survive a fork
        ctx = mp.get_context("spawn")
        spec = (str(self.dataset.directory), self.tokens, self.batch_size, self.max_seq_len, self.gen_ratios,
                self.seed, self.rank, self.world_size, self.cells, self.pad_to_max, self.batching, self.length_step,
                self.accum, self.tokens_per_batch, self.devices_per_rank, self.read_block_cells)
        with ctx.Pool(self.num_workers, initializer=_worker_init, initargs=spec) as pool:
            pending: collections.deque = collections.deque()
            positions = self._positions()
            depth = max(1, self.prefetch) * self.num_workers
            for pos in positions:
                pending.append(pool.apply_async(_worker_batch, pos))
                if len(pending) >= depth:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()


@dataclass
class RowsOf:
    """Rows ``start:stop`` of a read in flight (one step of a group read)."""

    read: PendingRead
    start: int
    stop: int

    def result(self) -> CellBatch:
        return self.read.result().rows(self.start, self.stop)


_WORKER_STREAM: BatchStream | None = None


def _worker_init(directory, tokens, batch_size, max_seq_len, gen_ratios, seed, rank, world_size, cells,
                 pad_to_max, batching, length_step, accum, tokens_per_batch, devices_per_rank,
                 read_block_cells) -> None:
    global _WORKER_STREAM
    _WORKER_STREAM = BatchStream(ShardedCells(directory), tokens, batch_size, max_seq_len, gen_ratios, seed,
                                 rank=rank, world_size=world_size, prefetch=0, cells=cells, pad_to_max=pad_to_max,
                                 batching=batching, length_step=length_step, accum=accum,
                                 tokens_per_batch=tokens_per_batch, devices_per_rank=devices_per_rank,
                                 read_block_cells=read_block_cells)
    _WORKER_STREAM.group_reads = False


def _worker_batch(epoch: int, step: int) -> dict[str, np.ndarray]:
    assert _WORKER_STREAM is not None
    return _WORKER_STREAM.batch(epoch, step)
