"""Next-token selection: greedy, temperature, top-k, top-p, repetition penalty, logit bias,
min_tokens, and the top log-probabilities of each step.

Each request owns a `Sampler` with its own numpy Generator, so the same seed gives the
same tokens whatever else the server is doing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REPETITION_PENALTY_RANGE = (0.01, 100.0)
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_LIMIT = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How a request picks its tokens; the defaults match the proto's documented ones."""

    # None: 64, or fewer where the context ends sooner.
    max_new_tokens: int | None = None
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
    # Samples per request; they share one prefill.
    n: int = 1
    # The k most likely tokens (ids and log-probabilities) at each step; 0 turns it off.
    top_logprobs: int = 0
    # EOS and stop_token_ids cannot end the generation before this many tokens, nor stop
    # sequences match text before it.
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    # Token id -> added to its logit before sampling (greedy included).
    logit_bias: tuple[tuple[int, float], ...] = ()
    include_stop_str_in_output: bool = False

    def check(self) -> None:
        """Raises ValueError naming the first field out of range (vocabulary-free checks)."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature:g}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p:g}")
        lo, hi = REPETITION_PENALTY_RANGE
        # A positive but tiny penalty divides logits into infinities: bound it both ways.
        if not (math.isfinite(self.repetition_penalty) and lo <= self.repetition_penalty <= hi):
            raise ValueError(
                f"repetition_penalty must be in [{lo:g}, {hi:g}], got {self.repetition_penalty:g}"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}, got {self.n}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}"
            )
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_tokens must be <= max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_tokens}"
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids, "
                f"got {len(self.stop_token_ids)}"
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias must hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}"
            )
        for token, bias in self.logit_bias:
            if not (math.isfinite(bias) and -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT):
                raise ValueError(
                    f"logit_bias values must be in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}], "
                    f"got {bias:g} for token {token}"
                )

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ValueError naming the field that holds a token id outside the vocabulary."""
        for name, ids in (
            ("stop_token_ids", self.stop_token_ids),
            ("logit_bias", [t for t, _ in self.logit_bias]),
        ):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"{name} holds token id {bad[0]}; this model's ids are 0 to {vocab_size - 1}"
                )


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


class Sampler:
    """Picks tokens for one request from its logits, one position at a time."""

    def __init__(
        self,
        params: SamplingParams,
        *,
        vocab_size: int,
        prompt_ids=(),
        eos_token_id: int | None = None,
        index: int = 0,
    ):
        self.params = params
        # Any int64 seed (the proto's type) works: negatives map onto the uint64 range.
        # Sample i of a request with n > 1 draws from seed + i.
        self._seed = None if params.seed is None else (params.seed + index) & (2**64 - 1)
        self._rng: np.random.Generator | None = None
        self.count = 0  # tokens taken so far (min_tokens)
        self.bias = None
        if params.logit_bias:
            self.bias = np.zeros(vocab_size, np.float32)
            for token, b in params.logit_bias:
                self.bias[token] += b
        # Tokens that may not end the generation before min_tokens.
        held = [*params.stop_token_ids, *([] if eos_token_id is None else [eos_token_id])]
        self.held = np.asarray(held, np.int64) if params.min_tokens and held else None
        # Tokens in the prompt or the output so far, for the repetition penalty.
        self.seen = np.zeros(vocab_size, dtype=bool)
        if len(prompt_ids):
            self.seen[np.asarray(prompt_ids, dtype=np.int64)] = True
        # The token is argmax(logits) and nothing else is computed: a batch can take its
        # argmax for all such rows at once and hand each its token through `take`.
        self.plain_greedy = (
            params.temperature == 0
            and params.repetition_penalty == 1.0
            and not params.logprobs
            and not params.top_logprobs
            and self.bias is None
            and self.held is None
        )

    def take(self, token: int) -> int:
        """Records `token` as chosen (what `pick` does after choosing it); returns it."""
        self.seen[token] = True
        self.count += 1
        return token

    def __call__(self, logits: np.ndarray) -> tuple[int, float]:
        """(token, log-probability of it under the model's raw distribution) for logits [V]."""
        token, logprob, _ = self.pick(logits)
        return token, logprob

    def pick(self, logits: np.ndarray) -> tuple[int, float, list[tuple[int, float]] | None]:
        """(token, its log-probability, the top_logprobs alternatives or None) for logits [V].

        Log-probabilities are of the model's raw distribution. Raises ValueError when the
        adjusted logits are not numbers (the request fails alone).
        """
        p = self.params
        raw = np.asarray(logits, dtype=np.float32)
        x = raw
        if p.repetition_penalty != 1.0 and self.seen.any():
            # CTRL-style (as in transformers): shrink positive logits, grow negative ones.
            x = x.copy()
            s = x[self.seen]
            x[self.seen] = np.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
        if self.bias is not None:
            x = x + self.bias
        if self.held is not None and self.count < p.min_tokens:
            x = x.copy() if x is raw else x
            x[self.held] = -np.inf
        allowed = x[~np.isneginf(x)]
        if allowed.size == 0 or not np.isfinite(allowed).all():
            raise ValueError("the adjusted logits are not finite numbers")
        if p.temperature == 0:
            token = int(np.argmax(x))
        else:
            token = self._sample(x.astype(np.float64) / p.temperature)
        self.take(token)
        lp = log_softmax(raw) if p.logprobs or p.top_logprobs else None
        logprob = float(lp[token]) if p.logprobs else 0.0
        top = None
        if p.top_logprobs:
            k = min(p.top_logprobs, lp.size)
            best = np.argpartition(-lp, k - 1)[:k]
            best = best[np.argsort(-lp[best], kind="stable")]
            top = [(int(t), float(lp[t])) for t in best]
        return token, logprob, top

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
        if self._rng is None:  # made on first use: greedy requests never draw
            self._rng = np.random.default_rng(self._seed)
        choice = int(self._rng.choice(probs.size, p=probs))
        return choice if idx is None else int(idx[choice])
