"""OneRec V1 on the tiny world: the CPU smoke run (seconds per hundred steps on 2 cores).

.venv/bin/onerec train --config experiments/v1_world_tiny.py --workdir runs/v1_tiny
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # model init and example order (and the world's seed when world_seed is -1)
    c.world_seed = -1  # seed of the world itself (items, users); -1: seed
    # How the world's splits are drawn: "time_cut" (per user, disjoint). Older world runs read
    # as "hash" (splits over shared requests) and are refused by train and eval.
    c.world_split = "time_cut"
    c.rung = ""  # a named size (onerec_jax/model/rungs.py); sets model.* / data.* fields
    c.source = "world:tiny"  # data source (onerec_jax.data.sources.open_source)
    c.tokenizer_dir = ""  # semantic-id table dir; "" = WORKDIR/tokenizer, built if missing
    c.tokenizer_codes = 0  # codes per level when the table is built here (0: auto, ~sqrt(items))
    c.steps = 200  # optimizer steps in total (a resumed run continues to this)
    c.batch_size = 32  # requests per step (each with up to max_targets target items)
    c.workers = 0  # grain worker processes
    c.log_every = 10  # steps between TensorBoard/metrics.jsonl writes
    c.checkpoint_every = 50  # steps between checkpoints (and one at the end)
    c.eval_every = 50  # steps between validation-loss evals (0: at the end only)
    c.eval_requests = 256  # validation requests per eval (all of a smaller split); 0: no eval loss
    c.keep_checkpoints = 3  # newest checkpoints kept on disk
    c.bf16 = False  # bf16 compute (parameters and optimizer stay float32)

    c.data = ml_collections.ConfigDict()
    c.data.short_len = 20  # short-term pathway events
    c.data.pos_len = 32  # positive-feedback pathway events (report: 256)
    c.data.life_len = 64  # lifelong pathway events (report: 2000)
    c.data.max_targets = 5  # m, target items per request

    c.model = ml_collections.ConfigDict()
    c.model.family = "v1"  # "v1" encoder-decoder | "v2" lazy decoder-only
    c.model.d_model = 32  # D
    c.model.n_heads = 4
    c.model.d_ff = 64  # FFN width
    c.model.ffn = "swiglu"  # dense FFN: "swiglu" (3 matrices) | "mlp" (GELU, 2; the report's)
    c.model.enc_layers = 1  # V1 encoder blocks (V2 has none)
    c.model.dec_layers = 2  # decoder blocks
    c.model.n_queries = 8  # QFormer queries over the lifelong pathway (report: 128)
    c.model.qformer_blocks = 1  # QFormer blocks (cross-attention + FFN each)
    c.model.author_dim = 16  # author embedding width (report: 512)
    c.model.feature_dim = 8  # other feature embedding widths (report: 128)
    c.model.moe_experts = 0  # 0: dense decoder FFN; else routed experts per decoder block
    c.model.moe_top_k = 2
    c.model.moe_d_ff = 0  # expert hidden width; 0: model.d_ff
    c.model.moe_shared = 0  # shared (always active) experts
    c.model.moe_dispatch = "capacity"  # "capacity" (fast on CPU) | "dropless" (ragged_dot)
    c.model.session_wise = False  # V1: decode the m target items as one sequence
    c.model.first_dense = 0  # V2 with MoE: the first blocks keep a dense FFN
    c.model.context_dim = 0  # V2: width of the context pathways; 0 = d_model
    c.model.context_heads = 0  # V2: QFormer heads of the context processor; 0 = n_heads
    c.model.context_ff = 0  # V2: QFormer FFN width of the context processor; 0 = d_ff
    c.model.l_kv = 1  # V2: sets of decoder layers with their own context K/V
    c.model.s_kv = 1  # V2: 1 = one tensor is key and value, 2 = separate keys and values
    c.model.g_kv = 0  # V2: key/value heads of the context (grouped-query); 0 = n_heads
    c.model.loss = "sum"  # "sum" (report) | "mean" over the semantic-id levels

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-3  # peak
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1  # micro-batches per step
    return c
