"""The base training config: every field of a run, commented. Every named config derives from it.

It is also the CPU smoke run (OneRec V1 on the tiny world, seconds per hundred steps on 2 cores):

    onerec train --config default --workdir runs/v1_tiny

`model.family` picks the model; `model.v1` / `model.v2` hold that family's fields, whose keys
are the fields of the model dataclasses (`V1Config` in onerec_jax/model/v1.py, `V2Config` in
onerec_jax/model/v2.py, `EncoderConfig` in onerec_jax/model/user_encoder.py, `MoEConfig` in
onerec_jax/model/moe.py). Resolving a config (onerec_jax/config.py) keeps only the family's
own section, so a run's config.json lists exactly the fields its model reads.
"""

import ml_collections


def moe_section() -> ml_collections.ConfigDict:
    """The routed-expert FFN of a family's decoder blocks (MoEConfig)."""
    m = ml_collections.ConfigDict()
    m.n_experts = 0  # 0: a dense FFN in every decoder block; else routed experts per block
    m.top_k = 2  # experts per token
    m.d_ff = 0  # expert hidden width; 0: the family's d_ff
    m.n_shared = 0  # shared (always active) experts
    m.dispatch = "capacity"  # "capacity" (fast on CPU) | "dropless" (ragged_dot)
    return m


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
    # Activation rematerialisation of the scanned layer stacks (onerec_jax/model/layers.py):
    # "none" | "full" (recompute each layer in the backward pass) | "dots" (keep the weight
    # matmuls' outputs, recompute the rest). Trades compute for memory; the results are the
    # same, so it may change between a run and its resumption.
    c.remat = "none"
    # Compile the layer stacks unrolled, one copy of the layer per layer: faster steps (no
    # activation buffers stacked over layers to zero and copy; 22 % of a small V1 step on CPU)
    # for compile time that grows with depth. Same parameters and checkpoints, so it may change
    # between a run and its resumption.
    c.unroll_layers = False
    # No compute on padding: 0 = the decoder's dense FFNs and output head run on every target
    # position; N > 0 = on the real target tokens only, rounded up to a multiple of 1/N of the
    # positions (each rounded size is one compile). Same loss and gradients (tested); one batch
    # shard on one process only. On 2 CPU cores 0.75-1.12x (v2-8.9m 1.12x with 16; BENCHMARKS.md).
    c.pack_targets = 0

    c.data = ml_collections.ConfigDict()
    c.data.short_len = 20  # short-term pathway events
    c.data.pos_len = 32  # positive-feedback pathway events (report: 256)
    c.data.life_len = 64  # lifelong pathway events (report: 2000)
    c.data.max_targets = 5  # m, target items per request
    # Logged sources only: the most events one training example takes as its targets (a
    # user's training events are cut into sessions of at most this many, after 30-minute gaps
    # too). 1 = every training event is an example of its own whose history is every earlier
    # event: training on every prefix of a history, the setting of a next-item test target.
    c.data.log_session_len = 5
    # E-commerce sources (world:mall-*): the request's scenario as a conditioning token and each
    # event's scenario as a feature; behaviour pathways of the latest clicked / carted /
    # ordered products (0: none; onerec_jax/model/user_encoder.py).
    c.data.scenarios = False
    c.data.click_len = 0
    c.data.cart_len = 0
    c.data.order_len = 0

    c.model = ml_collections.ConfigDict()
    c.model.family = "v1"  # "v1" encoder-decoder | "v2" lazy decoder-only

    # OneRec V1 (V1Config): user encoder -> decoder with cross-attention to its memory.
    v1 = c.model.v1 = ml_collections.ConfigDict()
    v1.dec_layers = 2  # decoder blocks
    v1.n_heads = 4  # decoder heads
    v1.d_ff = 64  # decoder FFN width
    v1.ffn = "swiglu"  # dense FFN: "swiglu" (3 matrices) | "mlp" (GELU, 2; the report's)
    v1.session_wise = False  # decode the m target items of a request as one sequence
    v1.loss = "sum"  # per item: "sum" (report) | "mean" over the semantic-id levels
    v1.encoder = ml_collections.ConfigDict()  # EncoderConfig: pathways + encoder stack
    v1.encoder.d_model = 32  # D, the width of encoder and decoder alike
    v1.encoder.n_layers = 1  # encoder blocks
    v1.encoder.n_heads = 4
    v1.encoder.d_ff = 64  # FFN width of encoder and QFormer blocks
    v1.encoder.ffn = "swiglu"
    v1.encoder.n_queries = 8  # QFormer queries over the lifelong pathway (report: 128)
    v1.encoder.qformer_blocks = 1  # QFormer blocks (cross-attention + FFN each)
    v1.encoder.author_dim = 16  # author embedding width (report: 512)
    v1.encoder.feature_dim = 8  # other feature embedding widths (report: 128)
    v1.encoder.behaviour_fusion = "concat"  # behaviour pathways: "concat" | "cross"
    v1.moe = moe_section()

    # OneRec-V2 (V2Config): lazy decoder-only; the context processor has no encoder stack.
    v2 = c.model.v2 = ml_collections.ConfigDict()
    v2.n_layers = 2  # decoder blocks
    v2.d_model = 32  # decoder width
    v2.n_heads = 4
    v2.d_ff = 64  # dense FFN width
    v2.ffn = "swiglu"  # "swiglu" | "mlp"
    v2.first_dense = 0  # with MoE: the first blocks keep a dense FFN (paper: 2)
    v2.loss = "sum"  # per item: "sum" over levels | "mean" (the V2 paper; the v2 rungs set it)
    v2.l_kv = 1  # sets of decoder layers with their own context K/V
    v2.s_kv = 1  # 1 = one tensor is key and value, 2 = separate keys and values
    v2.g_kv = 0  # key/value heads of the context (grouped-query); 0 = n_heads
    v2.context = ml_collections.ConfigDict()  # EncoderConfig of the pathways (no stack)
    v2.context.d_model = 32  # width of the context pathways
    v2.context.n_heads = 4  # QFormer heads
    v2.context.d_ff = 64  # QFormer FFN width
    v2.context.ffn = "swiglu"
    v2.context.n_queries = 8  # QFormer queries over the lifelong pathway
    v2.context.qformer_blocks = 1
    v2.context.author_dim = 16
    v2.context.feature_dim = 8
    v2.context.behaviour_fusion = "concat"  # behaviour pathways: "concat" | "cross"
    v2.moe = moe_section()

    # The device mesh (onerec_jax/sharding.py): sizes of its four axes, their product the number
    # of devices; -1 = the devices left. May change between a run and its resumption.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data parallelism (parameters replicated)
    c.mesh.fsdp = 1  # fully-sharded data parallelism (parameters and moments split)
    c.mesh.tensor = 1  # tensor parallelism (heads, FFN width, vocabulary)
    c.mesh.expert = 1  # expert parallelism (routed experts)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-3  # peak
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1  # micro-batches per step
    # dtype the AdamW moments are stored in between steps: "float32" | "bfloat16" (half the
    # optimizer memory; the update is still computed in float32, parameters stay float32)
    c.optim.moment_dtype = "float32"
    return c
