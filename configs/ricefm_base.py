"""The published riceFM pretraining setup (DESIGN.md section 4; the fixture's args.json keys in comments).

Every key is read by both trainers; legal values are written next to the key.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 256  # embsize
    c.model.n_heads = 4  # nheads; must divide d_model
    c.model.n_layers = 6  # nlayers
    c.model.d_hid = 256  # d_hid
    c.model.dropout = 0.2  # every dropout of the model, attention weights included
    # fast: masks from cheap random bits (ricefm_npu/dropout.py, ricefm_jax/dropout.py; the configured rate,
    # ~1/5 of the cost on CPU); framework: F.dropout / nnx.Dropout. CUDA/NPU torch always use their fused kernels
    c.model.dropout_masks = "fast"
    c.model.n_bins = 51  # n_bins: 0 (zero) + 50 quantile bins
    c.model.input_emb_style = "continuous"  # the only supported value-input style (as published)
    c.model.max_value = 512.0  # value encoder clamps inputs here
    c.model.layer_norm_eps = 1e-5
    c.model.n_modalities = 2  # 0 = scRNA-seq, 1 = spatial
    c.model.n_layers_cls = 3  # cell-type head depth (fine-tuning): (Linear, ReLU, LayerNorm) x 2 + Linear
    # Attention kernel: auto (per device: npu_fusion on NPU, sdpa on CUDA and dropout-free CPU, math for CPU
    # training with dropout; JAX: math) | math (exact reference, both) | sdpa, npu_fusion (torch) | dot_product (JAX)
    c.model.attention = "auto"
    c.model.pad_value = -2.0  # value of <cls> and padding
    c.model.mask_value = -1.0  # args.json mask_value (kept for published exports)

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""  # set by --data DIR
    c.data.max_seq_len = 1200  # tokens per cell incl. <cls>; longer cells are sub-sampled per batch
    c.data.batch_size = 64  # cells per device per micro-batch
    c.data.eval_batch_size = 64  # cells per validation batch (every validation cell is used)
    c.data.gen_ratios = (0.25, 0.5, 0.75)  # mask_ratio: gen fraction drawn per batch, each in (0, 1)
    c.data.valid_fraction = 0.1  # valid_size_or_ratio
    c.data.seed = 0  # split, epoch order and gen/pcpt split
    # bucketed: cells of similar length batched together (sorted within shuffle windows) and padded to a
    # multiple of 64 tokens; published: random batches padded to the longest cell (exact reproduction)
    c.data.batching = "bucketed"
    # bucketed lengths are multiples of this: a compiled (XLA) step makes one program per length and gen ratio,
    # ceil(max_seq_len / length_step) x 3 at most (57 at 1,200); 128 or 256 compile fewer and pad more
    c.data.length_step = 64
    # 0: micro-batches of batch_size cells; > 0 (bucketed only): token positions per device per micro-batch instead,
    # tokens_per_batch // L cells at bucket length L (short cells in big batches, long ones in small); >= max_seq_len
    c.data.tokens_per_batch = 0
    # 1: the epoch order shuffles single cells (published). > 1: it shuffles runs of this many stored cells and a
    # rank reads the cells of 32 steps at once, a few large requests instead of one or two per cell: for datasets
    # in object storage (e.g. 256; a batch then draws from 32 x global batch / 256 runs, 8 at batch 64)
    c.data.read_block_cells = 1
    c.data.prefetch = 4  # batches read ahead
    c.data.num_workers = 0  # loader processes (0 = a background thread)

    c.optim = ml_collections.ConfigDict()  # Adam (torch.optim.Adam / optax.adam)
    c.optim.lr = 1e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0  # L2 added to the gradient, as torch Adam's weight_decay
    c.optim.schedule = "cosine"  # the only schedule: linear warmup from 0, cosine decay to 0
    c.optim.warmup_fraction = 0.1  # warmup_ratio_or_step
    c.optim.grad_clip_norm = 1.0
    c.optim.grad_accum_steps = 1  # micro-batches per optimizer step

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 20  # used when max_steps = 0
    c.train.seed = 0  # initial weights (ricefm.init) and dropout
    c.train.cell_emb_pass_after = 0  # published runs had the second (cell-embedding) pass on from step 0
    c.train.precision = "auto"  # auto (fp32 on CPU, bf16 on CUDA/TPU, fp16 + grad scaler on NPU) | fp32 | bf16 | fp16
    c.train.max_steps = 0  # optimizer steps; 0 = epochs x steps per epoch
    c.train.stop_at_step = 0  # stop (with a checkpoint) at this step, as if interrupted; 0 = run to the end
    c.train.init_checkpoint = ""  # start from these weights (any checkpoint format); "" = ricefm.init
    c.train.log_every = 100  # steps per metrics.jsonl line / TensorBoard point
    c.train.checkpoint_every = 3000  # save_interval; validation and best/ export run at every checkpoint
    # JAX: compiled step programs are kept here and reused by --resume and later runs ("auto": WORKDIR/xla_cache;
    # "": none); several runs may share one directory. The torch trainer has nothing to compile.
    c.train.compilation_cache = "auto"
    # keep: the process reuses freed host memory instead of faulting it in again every step (faster CPU steps; the
    # process holds its peak memory: ricefm/host_memory.py); release: glibc's defaults
    c.train.host_memory = "keep"
    return c
