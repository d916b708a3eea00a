"""No compute on padding: with a `capacity` the decoder's dense FFNs and output head run on the
real target tokens (and at most a bucket of padding), and the step computes the same loss and
gradients as over every position.

Tolerances as in test_memory_options: the same float32 operations on gathered rows, fused
differently by XLA: losses to 1e-6 relative, gradients to 1e-5 of the gradient's norm."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from onerec_jax.train import step as step_lib
from onerec_jax.train.model_factory import build_model
from tests.test_memory_options import VOCAB, _batch, _cfg, _state


@pytest.fixture(scope="module")
def src():
    from onerec_jax.data import sources

    return sources.open_source("world:tiny", split="train")


def test_token_capacity_rounds_the_fullest_micro_batch_up_to_a_bucket():
    codes = np.zeros((8, 5, 3), np.int32)  # 8 requests x 5 items x 3 codes = 120 positions
    codes[:, 2:] = -1  # 2 real items each: 48 real tokens
    assert step_lib.token_capacity(codes) == 60  # buckets of 30: 48 -> 60
    codes[0, 2:] = 0  # request 0 full: 57 real tokens -> 60
    assert step_lib.token_capacity(codes) == 60
    # Two micro-batches of 60 positions (buckets of 15): the first holds 33 real tokens -> 45.
    assert step_lib.token_capacity(codes, grad_accum=2) == 45
    assert step_lib.token_capacity(np.zeros((8, 5, 3), np.int32)) is None  # nothing to skip
    assert step_lib.token_capacity(np.full((8, 5, 3), -1, np.int32)) == 30  # one bucket at least
    assert step_lib.token_capacity(np.full((8, 5, 3), -1, np.int32), buckets=1) is None


@pytest.mark.parametrize(
    "family",
    [
        # slow: V2's case below runs the same packing code (pack_index, on_rows, the block's
        # FFN, the head) through a dense stack and an MoE stack; V1's logits mirror it
        pytest.param(["model.family=v1"], marks=pytest.mark.slow),
        # one sequence per request: padded items trail the real ones, causal attention keeps
        # them out of the real positions
        pytest.param(["model.family=v1", "model.v1.session_wise=True"], marks=pytest.mark.slow),
        # two stacks, one MoE: the MoE masks padding itself, the head and the dense stack pack
        ["model.family=v2", "model.v2.moe.n_experts=4", "model.v2.first_dense=1"],
    ],
    ids=["v1", "v1-session", "v2-moe"],
)
def test_a_packed_step_computes_the_same_loss_and_gradients_on_fewer_rows(family, src):
    cfg = _cfg(*family)
    model = build_model(cfg, src, VOCAB)
    batch = _batch(cfg, src)
    codes = np.asarray(batch["target_codes"])
    capacity = step_lib.token_capacity(codes)
    b, m, q = codes.shape
    assert capacity is not None and capacity < b * m * q  # this batch has padding to skip
    tx, _ = step_lib.make_optimizer(step_lib.OptimConfig())
    state = _state(model, tx, batch)

    def loss_and_grads(params, capacity):
        grad = jax.value_and_grad(step_lib._micro_loss, has_aux=True)
        return grad(params, state.moe_bias, model, batch, 0.01, capacity)

    # The packed program really multiplies `capacity` rows: its head's matmul is
    # [capacity, D] x [D, n_tokens]; the unpacked one's is [B * M * Q, D] x [D, n_tokens].
    jaxprs = {c: str(jax.make_jaxpr(loss_and_grads, static_argnums=1)(state.params, c))
              for c in (None, capacity)}  # fmt: skip
    n_tokens = sum(VOCAB) + 1

    def head_matmul(rows: int, jaxpr: str) -> bool:
        return re.search(rf"f32\[{rows},{n_tokens}\] = dot_general", jaxpr) is not None

    assert head_matmul(capacity, jaxprs[capacity]) and not head_matmul(b * m * q, jaxprs[capacity])
    assert head_matmul(b * m * q, jaxprs[None])

    full, packed = jax.jit(lambda p: (loss_and_grads(p, None), loss_and_grads(p, capacity)))(
        state.params
    )
    (loss0, m0), g0 = full
    (loss, metrics), g = packed
    assert np.isfinite(float(loss0)) and float(m0["items"]) > 0
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    np.testing.assert_allclose(metrics["nll_per_level"], m0["nll_per_level"], rtol=1e-5)
    norm = float(optax.tree.norm(g0))
    diff = float(optax.tree.norm(jax.tree.map(jnp.subtract, g, g0)))
    assert diff <= 1e-5 * norm, (diff, norm)


def test_bad_packing_settings_are_refused_before_anything_is_written(tmp_path):
    """A negative `pack_targets` is one error naming the field; a batch that does not split
    into its micro-batches is refused before the workdir holds a config."""
    from onerec_jax import config
    from onerec_jax.configs import default
    from onerec_jax.train import loop

    def cfg(*overrides):
        return config.resolve(default.get_config(), ["model.family=v2", *overrides])

    with pytest.raises(ValueError, match=r"config field pack_targets must be >= 0, got -1"):
        cfg("pack_targets=-1")
    with pytest.raises(ValueError, match=r"batch_size 8 does not split into optim.grad_accum 3"):
        loop.train(cfg("pack_targets=8", "batch_size=8", "optim.grad_accum=3"), tmp_path)
    assert not (tmp_path / "config.json").exists()


# Slow (~90 s on 2 cores: a V2 step compiled for three capacities): the default suite checks
# the packed step's loss and gradients above and the loop's refusals.
@pytest.mark.slow
def test_a_run_packs_its_targets_and_bad_settings_are_refused_before_anything_is_written(
    tmp_path, monkeypatch
):
    """`pack_targets` through `onerec train`'s loop: a V2 run trains with packed steps and logs
    finite losses; after a refused setting the corrected command trains in the same
    workdir."""
    from onerec_jax import config
    from onerec_jax.configs import default
    from onerec_jax.train import loop
    from tests.test_train_loop import _table

    def cfg(*overrides):
        base = ["model.family=v2", "steps=3", "batch_size=8", "eval_requests=0", "log_every=1"]
        base.append(f"tokenizer_dir={_table(tmp_path / 'tok', 500)}")  # world:tiny's 500 items
        return config.resolve(default.get_config(), [*base, *overrides])

    with pytest.raises(ValueError, match=r"config field pack_targets must be >= 0, got -1"):
        cfg("pack_targets=-1")
    bad = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"batch_size 8 does not split into optim.grad_accum 3"):
        loop.train(cfg("pack_targets=8", "optim.grad_accum=3"), bad)
    assert not (bad / "config.json").exists()
    calls = []
    real = step_lib.jit_train_step

    def spy(*a, **k):  # records the capacity of every step the loop runs
        fn = real(*a, **k)
        return lambda *args: calls.append(args[3]) or fn(*args)

    monkeypatch.setattr(step_lib, "jit_train_step", spy)
    summary = loop.train(cfg("pack_targets=8"), bad)  # the corrected command, same workdir
    assert summary["status"] == "finished" and np.isfinite(summary["final_train_loss"])
    # Every step packed (None would mean every position; the table's levels set the count).
    assert len(calls) == 3 and all(isinstance(c, int) for c in calls), calls
