"""The e-commerce world (`world:mall-tiny`, `world:mall-small`): OneMall's three scenarios.

The session world (onerec_jax/data/world.py) with products instead of videos. Everything the
video world has - users with drifting interests, the per-user time cut into train / validation /
test requests, a logging policy over topics (here product categories), example i a pure
function of (seed, split, i) - holds here; what changes:
  * Each product has a price (log-normal around its category's median) and is shown in a subset
    of the three scenarios: product cards, short videos, live streams (`schema.SCENARIOS`).
  * Each request (user, session) happens in one scenario, drawn from the user's own scenario
    preferences; the logging policy samples products among those that scenario shows.
  * Each exposure is clicked, added to the cart and ordered (flags CLICK, CART, ORDER; each
    step only after the one before) with the probabilities of onerec_jax/data/mall_config.py,
    which depend on the scenario. `true_engagement` returns their exact expectations, the
    expected GMV (price x P(order)) and the true reward of any product for any request; a
    product the request's scenario cannot show earns 0 in all of them.
  * No play time: play_ms and dur_ms are unknown (NaN) on every event.

Raw batches carry the request's `scenario` (1..3) and every history event's `hist_scenario`.

`world:mall-tiny:live` (a `scenario`) is the same world restricted to the requests of one
scenario: each split keeps exactly its requests in that scenario (enumerated once, 4 bytes per
request kept), so one model per scenario trains and is judged on its own scenario's traffic, and
any run can be evaluated on one scenario's requests (`onerec eval --scenario live`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onerec_jax.data import hashing as hs
from onerec_jax.data import schema
from onerec_jax.data.mall_config import (
    BEHAVIOUR,
    CART_BIAS,
    CLICK_BIAS,
    FIT_SD,
    MALL_PRESETS,
    MALL_REWARD_WEIGHTS,
    ORDER_BIAS,
    MallConfig,
)
from onerec_jax.data.world import World
from onerec_jax.data.world_oracle import _sigmoid

_AVAIL, _PRICE, _SCEN, _SCEN_PICK, _RHO, _FIT, _MEVT = 31, 32, 33, 34, 35, 36, 37
_K = len(schema.SCENARIOS)


class MallWorld(World):
    """A random-access source of e-commerce requests (see the module docstring)."""

    def __init__(
        self,
        config: MallConfig | str,
        seed: int = 0,
        split: str = "train",
        order_seed: int = 0,
        scenario: str = "",
    ):
        if scenario and scenario not in schema.SCENARIOS:
            raise ValueError(
                f"unknown scenario {scenario!r} of the e-commerce world; choose from "
                f"{list(schema.SCENARIOS)}"
            )
        self.scenario = scenario
        if isinstance(config, str):
            if config not in MALL_PRESETS:
                known = sorted(MALL_PRESETS)
                raise ValueError(f"unknown e-commerce world preset {config!r}; choose from {known}")
            config = MALL_PRESETS[config]
        super().__init__(config, seed=seed, split=split, order_seed=order_seed)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "scenario": self.scenario}

    # ---------------------------------------------------------------- tables
    def _build(self) -> None:
        super()._build()
        self._kept = None  # the scenario's requests of this split, enumerated when first asked
        c, seed = self.config, self.seed
        ids = np.arange(1, c.n_items + 1, dtype=np.int64)
        topic = self.topic[1:]
        cat = np.arange(c.n_topics)
        cat_median = c.median_price * np.exp(
            c.category_price_sd * hs.normal(hs.hash_u64(seed, _PRICE, -1 - cat))
        )
        price = cat_median[topic] * np.exp(c.price_sd * hs.normal(hs.hash_u64(seed, _PRICE, ids)))
        self.price = np.concatenate([[0.0], np.round(price, 2)])
        # log(price / category median): the price term of a user with price level 0.
        self._rel_price = np.concatenate([[0.0], np.log(self.price[1:] / cat_median[topic])])
        u = hs.unit53(hs.hash_u64(seed, _AVAIL, ids[:, None], np.arange(_K)))
        avail = u < np.asarray(c.availability)[None]
        avail[~avail.any(1), 0] = True  # every product is shown somewhere: on product cards
        self.available = np.concatenate([np.zeros((1, _K), bool), avail])  # [n_items + 1, K]
        self._fit = FIT_SD * hs.normal(hs.hash_u64(seed, _FIT, cat[:, None], np.arange(_K)))
        # Per scenario, the video world's sampling tables over the products it shows.
        w = ids.astype(np.float64) ** -c.zipf_alpha
        self._tables = []
        self._log_q_k = np.full((_K, c.n_items + 1), -np.inf)
        self._topic_entropy_k = np.zeros((_K, c.n_topics))
        for k in range(_K):
            on = np.nonzero(avail[:, k])[0]
            counts = np.bincount(topic[on], minlength=c.n_topics)
            if (counts == 0).any():
                raise ValueError(
                    f"e-commerce world seed {seed}: category {int(np.argmin(counts))} has no "
                    f"product in scenario {schema.SCENARIOS[k]!r}; use more items or a larger "
                    "availability"
                )
            order = on[np.argsort(topic[on], kind="stable")]
            seg_end = np.cumsum(counts)
            t_sorted = topic[order]
            z = np.bincount(t_sorted, weights=w[order], minlength=c.n_topics)
            cum = np.cumsum(w[order])
            seg_start = np.concatenate([[0.0], cum[seg_end[:-1] - 1]])
            cdf = t_sorted + (cum - seg_start[t_sorted]) / z[t_sorted]
            q = w[order] / z[t_sorted]
            self._tables.append((order + 1, seg_end, cdf))
            self._log_q_k[k, order + 1] = np.log(q)
            self._topic_entropy_k[k] = np.bincount(
                t_sorted, weights=-q * np.log(q), minlength=c.n_topics
            )

    # ------------------------------------------------------------- requests
    def _scenario_requests(self) -> np.ndarray:
        """Flat ids r = (u - 1) * n_sessions + (s - lo) of this split's requests in the
        scenario, ascending (int32 while they fit)."""
        if self._kept is None:
            lo, hi = self.config.split_sessions(self.split)
            k = 1 + schema.SCENARIOS.index(self.scenario)
            parts, chunk = [], max(1, 4_000_000 // (hi - lo))
            for u0 in range(1, self.config.n_users + 1, chunk):  # bounded memory per chunk
                u = np.arange(u0, min(u0 + chunk, self.config.n_users + 1))
                scen = self.scenario_of_session(u[:, None], np.arange(lo, hi)[None])
                r = (u[:, None] - 1) * (hi - lo) + np.arange(hi - lo)[None]
                parts.append(r[scen == k])
            r = np.concatenate(parts)
            self._kept = r.astype(np.int32 if r.max(initial=0) < 2**31 else np.int64)
            if len(self._kept) == 0:
                raise ValueError(f"{self.split} holds no request in scenario {self.scenario!r}")
        return self._kept

    @property
    def n_distinct(self) -> int:
        """Distinct requests in this split (of the scenario, when restricted to one)."""
        return len(self._scenario_requests()) if self.scenario else super().n_distinct

    @property
    def _order_salt(self) -> tuple[int, ...]:  # its own permutations when restricted
        return (1 + _K,) if self.scenario else ()

    def _flat_requests(self, positions: np.ndarray) -> np.ndarray:
        """The scenario's requests at the permuted positions (all of them when unrestricted)."""
        return self._scenario_requests()[positions] if self.scenario else positions

    # ------------------------------------------------------------- scenarios
    def scenario_of_session(self, u: np.ndarray, s: np.ndarray) -> np.ndarray:
        """The scenario (1..3) of request (user u, session s): a draw from the user's own
        scenario preferences, softmax(population logits + spread x N(0, 1) per user)."""
        c = self.config
        u, s = np.asarray(u, np.int64), np.asarray(s, np.int64)
        z = np.asarray(c.scenario_logits) + c.scenario_spread * hs.normal(
            hs.hash_u64(self.seed, _SCEN, u[..., None], np.arange(_K))
        )
        p = np.exp(z - z.max(-1, keepdims=True))
        cdf = np.cumsum(p / p.sum(-1, keepdims=True), -1)
        pick = hs.unit53(hs.hash_u64(self.seed, _SCEN_PICK, u, s))
        return 1 + np.minimum((pick[..., None] > cdf[..., :-1]).sum(-1), _K - 1)

    def request_scenario(self, user_ids: np.ndarray, request_ts: np.ndarray) -> np.ndarray:
        """The scenario (1..3) of requests given by user and request time."""
        return self.scenario_of_session(user_ids, self.session_of(user_ids, request_ts))

    def _price_level(self, u: np.ndarray) -> np.ndarray:
        return self.config.user_price_sd * hs.normal(hs.hash_u64(self.seed, _RHO, u))

    def _mall_probs(
        self, t: np.ndarray, pi: np.ndarray, rho: np.ndarray, scen: np.ndarray, items: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Exact P(click), P(cart), P(order) (unconditional) of items [..., N] for requests with
        interest topics t / weights pi [..., K_interests], price level rho [...] and scenario
        scen [...] (1..3); 0 where the scenario does not show the item."""
        ti, t2 = self.topic[items][..., None], self.topic2[items][..., None]
        aff = (pi[..., None, :] * ((t[..., None, :] == ti) + 0.5 * (t[..., None, :] == t2))).sum(-1)
        q = self.quality[items].astype(np.float64)
        x = self._rel_price[items] - np.asarray(rho, np.float64)[..., None]
        k = np.broadcast_to(np.asarray(scen)[..., None] - 1, items.shape)
        logits = {}
        for name, bias in (("click", CLICK_BIAS), ("cart", CART_BIAS), ("order", ORDER_BIAS)):
            wa, wq, wp = BEHAVIOUR[name]
            logits[name] = np.asarray(bias)[k] + wa * aff + wq * q + wp * x
        logits["order"] = logits["order"] + self._fit[self.topic[items], k]
        shown = self.available[items, k]
        click = _sigmoid(logits["click"]) * shown
        cart_c, order_c = _sigmoid(logits["cart"]), _sigmoid(logits["order"])
        return {
            "click": click,
            "cart": click * cart_c,
            "order": click * cart_c * order_c,
            "cart_given_click": cart_c,
            "order_given_cart": order_c,
        }

    # --------------------------------------------------------------- events
    def _events(
        self,
        u: np.ndarray,
        topics: np.ndarray,
        pi: np.ndarray,
        start: np.ndarray,
        s: np.ndarray,
        k: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Realise exposure k of session s of user u (the video world's contract)."""
        scen = self.scenario_of_session(u, s)
        h = hs.hash_u64(self.seed, _MEVT, u, s * 8 + k)
        topic = self._logged_topic(h, topics, pi)
        within = hs.unit53(hs.stream(h, 1))
        item = np.zeros(len(u), np.int64)
        for j, (order, seg_end, cdf) in enumerate(self._tables):
            at = scen == j + 1
            idx = np.searchsorted(cdf, topic[at] + within[at], side="right")
            item[at] = order[np.minimum(idx, seg_end[topic[at]] - 1)]
        p = self._mall_probs(topics, pi, self._price_level(u), scen, item[:, None])
        p = {n: v[:, 0] for n, v in p.items()}
        r_click, r_cart = hs.unit32_pair(hs.stream(h, 2))
        r_order, _ = hs.unit32_pair(hs.stream(h, 3))
        click = r_click < p["click"]
        cart = click & (r_cart < p["cart_given_click"])
        order = cart & (r_order < p["order_given_cart"])
        flags = (
            np.where(click, schema.CLICK, 0)
            | np.where(cart, schema.CART, 0)
            | np.where(order, schema.ORDER, 0)
        ).astype(np.uint8)
        # Within a session the next product is shown when the user is done with this one.
        dwell = 3 + 20 * click + 30 * cart + 30 * order
        nan = np.full(len(item), np.nan, np.float32)
        return {
            "item": item.astype(np.int32),
            "author": self.author[item],
            "tag": self.tag[item],
            "ts": schema.session_times(start, k, dwell),
            "play_ms": nan,
            "dur_ms": nan,
            "flags": flags,
            "scenario": scen.astype(np.uint8),
        }

    def raw_batch(
        self,
        indices: np.ndarray,
        max_events: int | None = None,
        spec: schema.SchemaSpec | None = None,
    ) -> dict[str, Any]:
        """The video world's raw requests plus the request's `scenario` [B] (1..3)."""
        out = super().raw_batch(indices, max_events, spec)
        out["scenario"] = self.request_scenario(out["user_id"], out["request_ts"]).astype(np.uint8)
        return out

    # ---------------------------------------------------------------- oracle
    def true_engagement(
        self, user_ids: np.ndarray, request_ts: np.ndarray, item_ids: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Exact expectations of showing `item_ids` [B, N] in the requests' own scenarios:
        click, cart, order (probabilities), gmv (price x P(order)) and `reward`
        (MALL_REWARD_WEIGHTS); all 0 for a product the scenario does not show."""
        user_ids, request_ts = np.asarray(user_ids), np.asarray(request_ts)
        items = np.asarray(item_ids)
        if items.min(initial=1) < 1 or items.max(initial=1) > self.n_items:
            raise ValueError(f"item ids must be in [1, {self.n_items}]")
        user = self._user(user_ids)
        s = self.session_of(user_ids, request_ts)
        pi = self._interest(user, s)
        scen = self.scenario_of_session(user_ids, s)
        p = self._mall_probs(user["topics"], pi, self._price_level(user_ids), scen, items)
        out = {n: p[n] for n in ("click", "cart", "order")}
        out["gmv"] = self.price[items] * p["order"]
        out["reward"] = sum(w * p[n] for n, w in MALL_REWARD_WEIGHTS.items())
        return out

    def shown_in(self, scenario: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Whether each item [B, N] can be shown in its request's scenario [B] (1..3)."""
        items = np.asarray(item_ids)
        k = np.broadcast_to(np.asarray(scenario, np.int64)[:, None] - 1, items.shape)
        return self.available[items, k]

    def logging_logprob(
        self, user_ids: np.ndarray, request_ts: np.ndarray, item_ids: np.ndarray
    ) -> np.ndarray:
        """log p(item | request) under the logging policy of the request's scenario, [B, N]."""
        items = np.asarray(item_ids)
        pt = self.logging_distribution(user_ids, request_ts)
        k = self.request_scenario(user_ids, request_ts)[:, None] - 1
        topic = self.topic[items].astype(np.int64)
        return np.log(np.take_along_axis(pt, topic, -1)) + self._log_q_k[k, items]

    def next_item_entropy(self, user_ids: np.ndarray, request_ts: np.ndarray) -> np.ndarray:
        """Exact entropy (nats) of the next exposure given the requests' latent state, [B]."""
        pt = self.logging_distribution(user_ids, request_ts)
        k = self.request_scenario(user_ids, request_ts) - 1
        return -(pt * np.log(pt)).sum(-1) + (pt * self._topic_entropy_k[k]).sum(-1)
