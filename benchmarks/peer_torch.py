"""The Hugging Face side of `benchmarks/peers.py`: a worker that runs in the peers' venv
(`.venv-peers`: torch CPU + transformers, never the project's install) and times, on request,
a T5 train step at the TIGER shape and T5 `generate` with a trie-constrained beam search.

It speaks the driver's line protocol (peer_protocol.py), so the peer and onerec_jax stay loaded
in two processes and their timed blocks can alternate. It imports no onerec_jax code: the two
sides share only the driver's SHAPE (sent in the setup message) and the trie's random seed.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import transformers
from peer_protocol import serve


def t5(shape: dict) -> transformers.T5ForConditionalGeneration:
    """The TIGER-size T5: shape["t5"] holds the T5Config fields (dropout 0)."""
    cfg = transformers.T5Config(**shape["t5"], dropout_rate=0.0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg)


def trie_items(seed: int, n_items: int, codes: int, levels: int) -> np.ndarray:
    """The random item table both sides build: unique rows of codes per level."""
    rng = np.random.default_rng(seed)
    return np.unique(rng.integers(0, codes, (n_items, levels)), axis=0)


class Train:
    """One AdamW train step of T5 on random tokens: batch x enc_len in, dec_len labels."""

    def __init__(self, shape: dict) -> None:
        self.model = t5(shape)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        vocab = shape["t5"]["vocab_size"]
        b = shape["batch"]
        self.inputs = torch.randint(2, vocab, (b, shape["context_tokens"]), generator=g)
        self.labels = torch.randint(2, vocab, (b, shape["levels"] + 1), generator=g)
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.inputs, labels=self.labels).loss
        loss.backward()
        self.opt.step()


class Beam:
    """`generate(num_beams=W, prefix_allowed_tokens_fn=...)` over a random item trie, level l's
    codes at token ids 2 + l * codes + c (0 and 1 are T5's pad/start and eos)."""

    def __init__(self, shape: dict, beam: int) -> None:
        self.model = t5(shape).eval()
        codes, levels = shape["codes"], shape["levels"]
        items = trie_items(shape["trie_seed"], shape["trie_items"], codes, levels)
        tokens = 2 + np.arange(levels)[None, :] * codes + items
        allowed: dict[tuple[int, ...], set[int]] = {}
        for row in tokens.tolist():
            for depth in range(levels):
                allowed.setdefault(tuple(row[:depth]), set()).add(row[depth])
        self.allowed = {k: sorted(v) for k, v in allowed.items()}
        self.levels, self.beam = levels, beam
        g = torch.Generator().manual_seed(1)
        users, vocab = shape["users"], shape["t5"]["vocab_size"]
        self.inputs = torch.randint(2, vocab, (users, shape["context_tokens"]), generator=g)
        self.n_items = len(items)

    def prefix_allowed(self, _batch_id: int, ids: torch.Tensor) -> list[int]:
        prefix = tuple(ids[1:].tolist())  # drop the decoder start token
        return self.allowed.get(prefix, [1])  # a finished item may only end (eos)

    @torch.no_grad()
    def step(self) -> None:
        self.model.generate(
            input_ids=self.inputs,
            num_beams=self.beam,
            num_return_sequences=self.beam,
            max_new_tokens=self.levels,
            min_new_tokens=self.levels,
            prefix_allowed_tokens_fn=self.prefix_allowed,
            do_sample=False,
            early_stopping=True,
        )


def setup(msg: dict) -> tuple:
    job = Train(msg) if msg["task"] == "train" else Beam(msg, msg["beam"])
    job.step()  # warm-up: first-call allocations
    return job.step, {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in job.model.parameters()),
    }


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    serve(setup)
