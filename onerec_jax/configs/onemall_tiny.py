"""OneMall on the e-commerce world (world:mall-tiny), sized for a 2-core CPU: one generator for
product cards, short videos and live streams.

    onerec train --config onemall_tiny --workdir runs/onemall
    onerec eval --workdir runs/onemall --split test --json     # per scenario: Recall, NDCG,
                                                               # true expected orders and GMV

The OneMall pieces on top of OneRec V1 (onerec_jax/model/user_encoder.py): the request's
scenario as a conditioning token and each event's scenario as a feature; behaviour pathways of
the latest clicked, carted and ordered products fused by cross-attention (carts read clicks,
orders read clicks and carts); the lifelong pathway compressed by the QFormer; a sparse-MoE
decoder. One model per scenario: `--config.source=world:mall-tiny:live`. The ablation of the
fusion: `--config.model.v1.encoder.behaviour_fusion=concat`, or no behaviour pathways
(`--config.data.click_len=0 --config.data.cart_len=0 --config.data.order_len=0`: one merged
sequence of exposures - the last 20 and the lifelong 128 - with their click/cart/order flags).
Every field not set here is the
default's (onerec_jax/configs/default.py).
"""

import ml_collections

from onerec_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.source = "world:mall-tiny"  # 600 products, 12 categories, three scenarios
    c.steps = 500
    c.batch_size = 64
    c.eval_every = 200
    c.checkpoint_every = 200
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 50
    c.data.scenarios = True
    c.data.short_len = 20
    # On the e-commerce world a strong positive is a click (no play time, no likes), which the
    # click pathway holds: the positive pathway keeps its minimum of one event, so the merged
    # ablation (no behaviour pathways) is the exposure sequences alone, behaviours as flags.
    c.data.pos_len = 1
    c.data.life_len = 128
    c.data.click_len = 32
    c.data.cart_len = 16
    c.data.order_len = 16
    v1 = c.model.v1
    v1.dec_layers = 2
    v1.d_ff = 128
    v1.encoder.d_model = 64
    v1.encoder.n_layers = 1
    v1.encoder.d_ff = 128
    v1.encoder.n_queries = 16
    v1.encoder.behaviour_fusion = "cross"
    v1.moe.n_experts = 4  # the sparse-MoE decoder: 4 experts, 2 per token
    v1.moe.top_k = 2
    return c
