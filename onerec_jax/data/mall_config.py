"""The e-commerce world's settings (onerec_jax/data/mall.py): its size and scenarios
(`MallConfig`), the named presets, and the behaviour model's coefficients.

Behaviour model, per exposure of product i in scenario k to a user with price level rho:
  click              logit = CLICK[k] + 2.5·a + 0.5·q
  add-to-cart|click  logit = CART[k] + 1.5·a + 0.4·q - 0.8·x
  order|cart         logit = ORDER[k] + 0.5·q - 0.5·x + fit(category, k)
with a the user's topic affinity and q the product's quality as in the video world, x =
log(price / its category's median price) - rho (how far the price is above what the user usually
pays), and fit(category, k) ~ N(0, FIT_SD^2) a fixed per-world draw: some categories sell in
live streams, others on product cards. So P(order) = P(click)·P(cart|click)·P(order|cart) and the
expected GMV of showing i is price_i · P(order), both exact.
"""

from __future__ import annotations

import dataclasses

from onerec_jax.data.world_config import WorldConfig

# Per scenario (card, video, live): product cards are clicked most; streams convert best.
CLICK_BIAS = (-1.0, -1.8, -2.2)
CART_BIAS = (-1.5, -1.2, -0.6)
ORDER_BIAS = (-0.8, -0.4, 0.1)
BEHAVIOUR = {  # (affinity, quality, price) weights of each step's logit
    "click": (2.5, 0.5, 0.0),
    "cart": (1.5, 0.4, -0.8),
    "order": (0.0, 0.5, -0.5),
}
FIT_SD = 0.7
# The scalar true reward of the e-commerce world (what `onerec align --reward true` maximises):
# expected clicks, carts and orders weighted by how far down the funnel they are.
MALL_REWARD_WEIGHTS = {"click": 1.0, "cart": 3.0, "order": 10.0}


@dataclasses.dataclass(frozen=True)
class MallConfig(WorldConfig):
    """A video world's fields (topics are product categories, authors shops, tags
    sub-categories) and the scenarios'. `max_session_len` is the products of one request."""

    # Probability that a product is shown in each scenario (card, video, live); a product in
    # none of them is put on product cards.
    availability: tuple[float, float, float] = (0.9, 0.5, 0.3)
    # Population logits of the scenario of a request, and the spread of each user's own
    # (a user who shops in live streams keeps doing so).
    scenario_logits: tuple[float, float, float] = (0.6, 0.0, -0.6)
    scenario_spread: float = 1.0
    median_price: float = 50.0  # currency units; each category's median is log-normal around it
    category_price_sd: float = 0.8  # log-scale spread of the category medians
    price_sd: float = 0.6  # log-scale spread of prices within a category
    user_price_sd: float = 0.5  # log-scale spread of users' price levels

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.availability) != 3 or not all(0 < a <= 1 for a in self.availability):
            raise ValueError(
                f"MallConfig.availability must be 3 shares in (0, 1], got {self.availability}"
            )
        if len(self.scenario_logits) != 3:
            raise ValueError(
                f"MallConfig.scenario_logits must have 3 entries, got {self.scenario_logits}"
            )
        if self.median_price <= 0:
            raise ValueError(f"MallConfig.median_price must be > 0, got {self.median_price}")
        for f in ("scenario_spread", "category_price_sd", "price_sd", "user_price_sd"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"MallConfig.{f} must be >= 0, got {getattr(self, f)}")


MALL_PRESETS: dict[str, MallConfig] = {
    # Unit tests and the README's experiment on 2 cores: seconds per hundred steps.
    "mall-tiny": MallConfig(
        n_users=2000, n_items=600, n_topics=12, authors_per_topic=8, max_sessions=200
    ),
    # Scaling sweeps on CPU: 3 x 256-code semantic ids.
    "mall-small": MallConfig(
        n_users=200_000,
        n_items=20_000,
        n_topics=64,
        authors_per_topic=32,
        tags_per_topic=4,
        max_sessions=500,
    ),
}
