"""Next-token selection: greedy, temperature, top-k, top-p and repetition penalty.

Each request owns a `Sampler` with its own numpy Generator, so the same seed gives the
same tokens whatever else the server is doing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How a request picks its tokens; the defaults match the proto's documented ones."""

    max_new_tokens: int = 64
    # 0 is greedy.
    temperature: float = 1.0
    # 0 turns it off.
    top_k: int = 0
    # In (0, 1]; 1 turns it off.
    top_p: float = 1.0
    # 1 turns it off; > 1 penalises tokens already in the prompt or output.
    repetition_penalty: float = 1.0
    # None: a fresh random seed.
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    def check(self) -> None:
        """Raises ValueError naming the first field out of range."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature:g}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p:g}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty:g}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


class Sampler:
    """Picks tokens for one request from its logits, one position at a time."""

    def __init__(self, params: SamplingParams, *, vocab_size: int, prompt_ids=()):
        self.params = params
        # Any int64 seed (the proto's type) works: negatives map onto the uint64 range.
        seed = None if params.seed is None else params.seed & (2**64 - 1)
        self.rng = np.random.default_rng(seed)
        # Tokens in the prompt or the output so far, for the repetition penalty.
        self.seen = np.zeros(vocab_size, dtype=bool)
        if len(prompt_ids):
            self.seen[np.asarray(prompt_ids, dtype=np.int64)] = True
        # The token is argmax(logits) and nothing else is computed: a batch can take its
        # argmax for all such rows at once and hand each its token through `take`.
        self.plain_greedy = (
            params.temperature == 0 and params.repetition_penalty == 1.0 and not params.logprobs
        )

    def take(self, token: int) -> int:
        """Records `token` as chosen (what __call__ does after picking it); returns it."""
        self.seen[token] = True
        return token

    def __call__(self, logits: np.ndarray) -> tuple[int, float]:
        """(token, log-probability of it under the model's raw distribution) for logits [V]."""
        p = self.params
        raw = np.asarray(logits, dtype=np.float32)
        x = raw
        if p.repetition_penalty != 1.0 and self.seen.any():
            # CTRL-style (as in transformers): shrink positive logits, grow negative ones.
            x = x.copy()
            s = x[self.seen]
            x[self.seen] = np.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
        if p.temperature == 0:
            token = int(np.argmax(x))
        else:
            token = self._sample(x.astype(np.float64) / p.temperature)
        self.seen[token] = True
        logprob = float(log_softmax(raw)[token]) if p.logprobs else 0.0
        return token, logprob

    def _sample(self, x: np.ndarray) -> int:
        p = self.params
        idx = None
        if 0 < p.top_k < x.size:
            idx = np.argpartition(-x, p.top_k - 1)[: p.top_k]
            x = x[idx]
        if p.top_p < 1.0:
            order = np.argsort(-x, kind="stable")
            probs = np.exp(x[order] - x[order[0]])
            probs /= probs.sum()
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            order = order[:keep]
            idx = order if idx is None else idx[order]
            x = x[order]
        probs = np.exp(x - np.max(x))
        probs /= probs.sum()
        choice = int(self.rng.choice(probs.size, p=probs))
        return choice if idx is None else int(idx[choice])
