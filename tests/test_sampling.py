"""Token selection: greedy, temperature, top-k, top-p, repetition penalty, seeds, logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge_server.inference.sampling import Sampler, SamplingParams, log_softmax

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.5, 2.9], dtype=np.float32)


def draws(params: SamplingParams, n: int = 200, logits=LOGITS) -> list[int]:
    sampler = Sampler(params, vocab_size=logits.size)
    out = []
    for _ in range(n):
        sampler.seen[:] = False  # independent draws from the same distribution
        out.append(sampler(logits)[0])
    return out


def test_greedy_picks_the_most_likely_token_with_its_logprob():
    token, logprob = Sampler(SamplingParams(temperature=0, logprobs=True), vocab_size=6)(LOGITS)
    assert token == 1
    assert logprob == pytest.approx(float(log_softmax(LOGITS)[1]), abs=1e-6)


def test_same_seed_gives_the_same_tokens_and_another_seed_others():
    a = draws(SamplingParams(seed=7), 50)
    assert a == draws(SamplingParams(seed=7), 50)
    assert a != draws(SamplingParams(seed=8), 50)
    assert draws(SamplingParams(seed=-5), 50) == draws(SamplingParams(seed=-5), 50)


def test_top_k_keeps_only_the_k_most_likely_tokens():
    assert set(draws(SamplingParams(top_k=2, temperature=5.0, seed=1))) == {1, 5}
    assert set(draws(SamplingParams(top_k=1, temperature=5.0, seed=1))) == {1}


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = np.exp(log_softmax(LOGITS))
    order = np.argsort(-probs)
    # The nucleus for p just above the top two tokens' mass is exactly the top three.
    p = float(probs[order[:2]].sum()) + 1e-3
    assert set(draws(SamplingParams(top_p=p, seed=3), 400)) == set(order[:3].tolist())
    assert set(draws(SamplingParams(top_p=1e-6, seed=3))) == {1}


def test_temperature_flattens_or_sharpens_the_distribution():
    cold = draws(SamplingParams(temperature=0.005, seed=0))
    hot = draws(SamplingParams(temperature=10.0, seed=0))
    assert set(cold) == {1}
    assert len(set(hot)) == 6


def test_repetition_penalty_demotes_tokens_already_seen():
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    sampler = Sampler(params, vocab_size=6, prompt_ids=[1])
    assert sampler(LOGITS)[0] == 5  # 3.0 / 2 = 1.5 < 2.9
    assert sampler(LOGITS)[0] == 2  # 5 was just emitted: 2.9 / 2 < 2.5
    negative = np.array([-1.0, -1.5], dtype=np.float32)
    assert Sampler(params, vocab_size=2, prompt_ids=[0])(negative)[0] == 1  # -1 * 2 < -1.5


def test_logprobs_are_of_the_model_distribution_for_sampled_tokens():
    sampler = Sampler(SamplingParams(seed=5, temperature=0.7, top_k=3, logprobs=True), vocab_size=6)
    for _ in range(10):
        token, logprob = sampler(LOGITS)
        assert logprob == pytest.approx(float(log_softmax(LOGITS)[token]), abs=1e-6)


@pytest.mark.parametrize(
    ("field", "params"),
    [
        ("temperature", SamplingParams(temperature=-0.1)),
        ("top_k", SamplingParams(top_k=-1)),
        ("top_p", SamplingParams(top_p=0.0)),
        ("top_p", SamplingParams(top_p=1.5)),
        ("repetition_penalty", SamplingParams(repetition_penalty=0.0)),
        ("max_new_tokens", SamplingParams(max_new_tokens=0)),
    ],
)
def test_out_of_range_params_name_the_field(field, params):
    with pytest.raises(ValueError, match=f"^{field} "):
        params.check()
