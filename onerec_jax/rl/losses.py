"""Policy-optimisation and preference losses of the OneRec papers (and GPPO), as pure functions.

Every loss takes log-probabilities under the current policy `logp` (differentiated), under the
policy that generated the rollouts `logp_old` (constants), advantages `adv` (constants) and a
`mask` of the rollouts that count, all of one shape: [B, G] for G rollouts of each of B users
when a rollout's probability is its item's (the sum of its codes' log-probabilities, as in the
papers), or [B, G, Q] for a per-code ratio. The loss is the masked mean over every entry, in
float32; a batch with nothing in its mask gives 0, not NaN.

Ratios are taken in log space (exp of a difference of log-probabilities), so an item of
probability 1e-30 under both policies has ratio 1, not 0/0.

    ECPO  (OneRec technical report) PPO's clipped surrogate against an "early-clipped" old
          policy pi'_old = max(sg(pi) / (1 + eps + delta), pi_old): a rollout the old policy
          found improbable cannot give a ratio above 1 + eps + delta, so a negative advantage
          cannot blow up the gradient. No KL term.
    GBPO  (OneRec-V2) no clipping; the ratio is pi / pi'_old with pi'_old = max(pi_old, sg(pi))
          for A >= 0 and max(pi_old, 1 - sg(pi)) for A < 0, in probability space. Every
          rollout keeps a gradient, and a bounded one: d ratio / d logp = ratio, which is
          <= 1 for A >= 0 and <= pi / (1 - pi) for A < 0 (<= 1 while pi <= 1/2), whatever
          pi_old: a rollout the old policy found improbable cannot explode the step.
    GPPO  (Klear-Reasoner) PPO's clipped surrogate whose clipped branches keep a gradient: the
          bound is written (1 +/- eps) * r / sg(r), which has the bound's value and the
          gradient (1 +/- eps) * A * d logp, where PPO's clip has none.
    DPO   (2502.18965's iterative preference alignment) -log sigmoid(beta * margin) of a
          chosen/rejected pair against a frozen reference policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The float32 mean of x over `mask` (all of x when None); 0 when nothing is masked in."""
    x = x.astype(jnp.float32)
    if mask is None:
        return jnp.mean(x)
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def group_advantages(
    rewards_BxG: jax.Array, mask_BxG: jax.Array | None = None, eps: float = 1e-6
) -> jax.Array:
    """GRPO's group-normalised advantages: (r - mean) / (std + eps) over each user's G
    rollouts (those in `mask`; the others get 0). A group whose rewards are all equal gets 0."""
    r = rewards_BxG.astype(jnp.float32)
    m = jnp.ones_like(r) if mask_BxG is None else mask_BxG.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m, -1, keepdims=True), 1.0)
    mean = jnp.sum(r * m, -1, keepdims=True) / n
    std = jnp.sqrt(jnp.sum(jnp.square(r - mean) * m, -1, keepdims=True) / n)
    return jnp.where(m > 0, (r - mean) / (std + eps), 0.0)


def ecpo_loss(
    logp: jax.Array,
    logp_old: jax.Array,
    adv: jax.Array,
    mask: jax.Array | None = None,
    eps: float = 0.2,
    delta: float = 0.1,
) -> jax.Array:
    """-mean min(r A, clip(r, 1 - eps, 1 + eps) A), r = pi / pi'_old (module docstring)."""
    logp = logp.astype(jnp.float32)
    early = jax.lax.stop_gradient(logp) - jnp.log1p(eps + delta)
    logp_old_early = jnp.maximum(early, logp_old.astype(jnp.float32))
    ratio = jnp.exp(logp - logp_old_early)
    a = adv.astype(jnp.float32)
    surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - eps, 1.0 + eps) * a)
    return -masked_mean(surrogate, mask)


def gbpo_loss(
    logp: jax.Array, logp_old: jax.Array, adv: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """-mean (pi / pi'_old) A (module docstring)."""
    logp = logp.astype(jnp.float32)
    lp = jax.lax.stop_gradient(logp)
    a = adv.astype(jnp.float32)
    # log pi'_old, never through exp and back: rollouts of log-probability -100 (a long
    # session) would underflow to 0 and give log(0). log(1 - pi) = log1p(-exp(lp)) is -inf at
    # pi = 1, where the max takes pi_old.
    bound = jnp.where(a >= 0, lp, jnp.log1p(-jnp.exp(jnp.minimum(lp, 0.0))))
    ratio = jnp.exp(logp - jnp.maximum(logp_old.astype(jnp.float32), bound))
    return -masked_mean(ratio * a, mask)


def gppo_loss(
    logp: jax.Array,
    logp_old: jax.Array,
    adv: jax.Array,
    mask: jax.Array | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> jax.Array:
    """-mean min(r A, clip_gp(r) A): PPO's surrogate whose clipped values keep the gradient
    (1 - eps_low) A d logp below the band and (1 + eps_high) A d logp above it.

    min(r A, clip(r) A) is min(r, 1 + eps_high) A for A >= 0 and max(r, 1 - eps_low) A for
    A < 0, so the clipped branch is picked explicitly; the ratio is never formed where it is
    clipped (exp of a log-ratio of +100 is inf, and even an unselected inf makes the
    gradient NaN)."""
    logp = logp.astype(jnp.float32)
    log_r = logp - logp_old.astype(jnp.float32)
    lr_sg = jax.lax.stop_gradient(log_r)
    a = adv.astype(jnp.float32)
    use_hi = (a >= 0) & (lr_sg > jnp.log1p(eps_high))
    use_lo = (a < 0) & (lr_sg < jnp.log1p(-eps_low))
    ratio = jnp.exp(jnp.where(use_hi | use_lo, 0.0, log_r))
    # (1 -/+ eps) r / sg(r) without the division: value 1 -/+ eps, gradient (1 -/+ eps) d logp.
    unit = jnp.exp(logp - jax.lax.stop_gradient(logp))
    r = jnp.where(use_hi, (1.0 + eps_high) * unit, jnp.where(use_lo, (1.0 - eps_low) * unit, ratio))
    return -masked_mean(r * a, mask)


def dpo_loss(
    logp_chosen: jax.Array,
    logp_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    beta: float = 0.1,
    mask: jax.Array | None = None,
) -> jax.Array:
    """-mean log sigmoid(beta ((logp_w - ref_w) - (logp_l - ref_l))) over the pairs."""
    margin = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)
    return -masked_mean(jax.nn.log_sigmoid(beta * margin.astype(jnp.float32)), mask)


LOSSES = {"ecpo": ecpo_loss, "gbpo": gbpo_loss, "gppo": gppo_loss}
