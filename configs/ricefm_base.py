"""The published riceFM pretraining setup (DESIGN.md section 4; the fixture's args.json keys in comments)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 256  # embsize
    c.model.n_heads = 4  # nheads
    c.model.n_layers = 6  # nlayers
    c.model.d_hid = 256  # d_hid
    c.model.dropout = 0.2
    c.model.n_bins = 51  # n_bins: 0 (zero) + 50 quantile bins
    c.model.input_emb_style = "continuous"
    c.model.max_value = 512.0  # value encoder clamps inputs here
    c.model.layer_norm_eps = 1e-5
    c.model.do_mvc = True
    c.model.n_modalities = 2  # 0 = scRNA-seq, 1 = spatial
    c.model.n_layers_cls = 3
    c.model.attention = "auto"  # auto = fastest exact kernel of the device; or math / sdpa / npu_fusion
    c.model.pad_token = "<pad>"
    c.model.pad_value = -2.0
    c.model.mask_value = -1.0

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""
    c.data.input_style = "binned"
    c.data.max_seq_len = 1200
    c.data.batch_size = 64  # per device
    c.data.eval_batch_size = 64
    c.data.gen_ratios = (0.25, 0.5, 0.75)  # mask_ratio: gen fraction drawn per batch
    c.data.valid_fraction = 0.1  # valid_size_or_ratio
    c.data.seed = 0
    c.data.prefetch = 4
    c.data.num_workers = 0  # loader processes (0 = a background thread)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"
    c.optim.lr = 1e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.schedule = "cosine"
    c.optim.warmup_fraction = 0.1  # warmup_ratio_or_step
    c.optim.grad_clip_norm = 1.0
    c.optim.grad_accum_steps = 1

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 20
    c.train.seed = 0
    c.train.cell_emb_pass_after = 0  # published runs had the second (cell-embedding) pass on from step 0
    c.train.precision = "auto"  # auto: fp16 + grad scaler on NPU/CUDA, bf16 autocast on CPU; or fp32 / bf16 / fp16
    c.train.max_steps = 0  # optimizer steps; 0 = epochs x steps per epoch
    c.train.stop_at_step = 0  # stop (with a checkpoint) at this step, as if interrupted; 0 = run to the end
    c.train.init_checkpoint = ""  # start from these weights (any checkpoint format)
    c.train.log_every = 100
    c.train.eval_every = 3000
    c.train.checkpoint_every = 3000  # save_interval
    return c
