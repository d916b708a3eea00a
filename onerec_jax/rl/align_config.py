"""The alignment config: every field of an `onerec align` run, commented.

`onerec align --method M --init WORKDIR --workdir DIR [--config FILE] [--config.field=value]`:
FILE is a Python file whose `get_config()` returns this config with some fields changed (it
defaults to this one); the model, data and tokenizer are the pre-trained run's (WORKDIR).
"""

from __future__ import annotations

import ml_collections

# One line each, as `onerec align --help` lists them.
METHODS = {
    "ecpo": "clipped ratio against an early-clipped old policy, group-normalised advantages, "
    "no KL (OneRec report)",
    "gbpo": "unclipped ratio against an old policy bounded below by sg(pi) or 1 - sg(pi): "
    "every rollout keeps a bounded gradient (OneRec-V2)",
    "gppo": "PPO clipping whose clipped rollouts keep a bounded gradient (Klear-Reasoner)",
    "dpo": "preference alignment: the best and worst of G beams by reward as chosen/rejected, "
    "DPO against the pre-trained policy plus NTP (2502.18965)",
    "rsft": "next-token training on the logged sessions that played longest only (the top "
    "rsft_keep share by play time; OneRec report)",
}
ROLLOUTS = ("beam", "sample")
REWARDS = ("true", "model", "logged")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "ecpo"  # one of METHODS (set by --method)
    c.seed = 0  # rollout sampling (the requests come in the pre-trained run's order)
    c.steps = 100  # policy updates in total (a resumed run continues to this)
    c.batch_size = 16  # requests per update (training split of the pre-trained run's source)
    c.group = 16  # rollouts per request (G): the group its advantages are normalised over
    c.rollout = "beam"  # "beam": the G best items by beam search; "sample": G draws from pi_old
    c.trie = True  # sample within the trie; False: free sampling judged by the format reward
    c.temperature = 1.0  # of sampled rollouts
    c.format_advantage = 1.0  # added to legal free samples' advantage (illegal: discarded)
    c.refresh = 1  # updates between refreshes of the old (rollout) policy
    # "true": the world's expected reward of each rolled-out item; "model": the P-Score of
    # `reward_model` (onerec reward-model), which then also scores the before/after lists
    # "logged": logged feedback alone (any source): a rollout that is one of the request's
    # logged target exposures earns that exposure's fused labels (the P-Score's weights), any
    # other earns `logged_miss`
    c.reward = "true"
    c.reward_model = ""  # a reward model's directory; "" = none
    c.logged_miss = 0.0  # reward=logged: the reward of an item the request did not log
    # What a rollout earns on the e-commerce world: "reward" (the true reward, or the ranking
    # model's fused score, 1 : 3 : 10 over click, cart, order) | "gmv" (expected GMV: price x
    # the world's P(order) with reward=true, price x the ranking model's P(order) with model);
    # with "gmv" the summary's reward_model@K is the ranking model's GMV estimate too
    c.objective = "reward"
    # How rewards become advantages: "group" (normalised within each request's G rollouts) |
    # "duration" (OneRec-V2's duration-aware shaping on the world: a rollout's expected play
    # time against the user's own plays of videos of similar length, +1 / -1 / 0; shaping.py)
    c.advantage = "group"
    c.history_sessions = 32  # the user's sessions before the request that "duration" reads
    c.ntp_weight = 0.1  # weight of the next-token loss on the logged targets, mixed in
    c.eps = 0.2  # ECPO's clip; GPPO's lower clip is eps_low, its upper eps_high
    c.delta = 0.1  # ECPO's early-clip margin: ratios stay below 1 + eps + delta
    c.eps_low = 0.2
    c.eps_high = 0.28
    c.dpo_beta = 0.1  # DPO's inverse temperature
    c.dpo_share = 1.0  # share of requests given a chosen/rejected pair (the paper: 1 %)
    c.rsft_keep = 0.5  # share of logged sessions RSFT trains on: the longest-played ones
    c.learning_rate = 1e-4  # constant after a linear warmup (the first update at lr / warmup)
    c.warmup_steps = 0
    c.weight_decay = 0.0  # AdamW's, of the matmul weights (towards 0, not towards INIT)
    c.log_every = 10
    # checkpoint_every and steps are multiples of `refresh`: a resumed run starts with a fresh
    # old policy, as an uninterrupted one does at that step
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.eval_requests = 256  # validation requests of the before/after comparison; 0: none
    c.eval_beam = 32  # beam of that comparison's top-K lists
    return c


def check(c: ml_collections.ConfigDict) -> None:
    """One ValueError naming the field for values no alignment run can use."""
    if c.method not in METHODS:
        raise ValueError(f"align method {c.method!r}: expected one of {sorted(METHODS)}")
    if c.rollout not in ROLLOUTS:
        raise ValueError(f"align field rollout={c.rollout!r}: expected one of {ROLLOUTS}")
    if c.reward not in REWARDS:
        raise ValueError(f"align field reward={c.reward!r}: expected one of {REWARDS}")
    at_least = {
        "steps": 1,
        "batch_size": 1,
        "group": 2,
        "refresh": 1,
        "log_every": 1,
        "checkpoint_every": 1,
        "keep_checkpoints": 1,
        "eval_requests": 0,
        "eval_beam": 1,
        "warmup_steps": 0,
        "history_sessions": 1,
    }
    for key, low in at_least.items():
        if c[key] < low:
            raise ValueError(f"align field {key} must be >= {low}, got {c[key]}")
    for key in ("checkpoint_every", "steps"):
        if c[key] % c.refresh:
            raise ValueError(
                f"align field {key} ({c[key]}) must be a multiple of refresh ({c.refresh}): a "
                "resumed run starts with a fresh old policy"
            )
    positive = {"learning_rate": c.learning_rate, "eps": c.eps, "eps_high": c.eps_high}
    for key, value in positive.items():
        if value <= 0:
            raise ValueError(f"align field {key} must be > 0, got {value}")
    for key in ("dpo_share", "rsft_keep"):
        if not 0 < c[key] <= 1:
            raise ValueError(f"align field {key} must be in (0, 1], got {c[key]}")
    if c.dpo_beta <= 0:
        raise ValueError(f"align field dpo_beta must be > 0, got {c.dpo_beta}")
    if not 0 < c.eps_low < 1:
        raise ValueError(f"align field eps_low must be in (0, 1), got {c.eps_low}")
    if c.delta < 0 or c.weight_decay < 0 or c.ntp_weight < 0:
        raise ValueError("align fields delta, weight_decay and ntp_weight must be >= 0")
    if c.temperature <= 0:
        raise ValueError(f"align field temperature must be > 0, got {c.temperature}")
    if c.advantage not in ("group", "duration"):
        raise ValueError(f"align field advantage={c.advantage!r}: expected 'group' or 'duration'")
    if c.advantage == "duration" and (c.reward != "true" or c.method in ("dpo", "rsft")):
        raise ValueError(
            "align field advantage='duration' reads the world's expected play time of each "
            "rollout: it needs reward='true' and a policy-gradient method (ecpo, gbpo, gppo)"
        )
    if c.objective not in ("reward", "gmv"):
        raise ValueError(f"align field objective={c.objective!r}: expected 'reward' or 'gmv'")
    if c.objective == "gmv" and (c.reward == "logged" or c.method == "rsft"):
        raise ValueError(
            "align field objective='gmv' scores rollouts by expected GMV: it needs reward "
            "'true' or 'model' and a method with rollouts (not rsft)"
        )
    if c.reward == "model" and not c.reward_model:
        raise ValueError("align field reward='model' needs reward_model (a directory)")
    if c.rollout == "beam" and not c.trie:
        raise ValueError("align field trie=False needs rollout='sample' (beams use the trie)")
