"""Streaming detokenization: UTF-8-safe deltas, stop sequences held back and cut exactly."""

from __future__ import annotations

import pytest

from lmforge_server.inference.detokenize import REPLACEMENT, IncrementalDetokenizer
from lmforge_worker.tokenization import build_tokenizer

CORPUS = "hello world, héllo wörld! €uro 😀 smile\n" * 20


@pytest.fixture(scope="module", params=["char", "byte", "bpe"])
def tok(request):
    return build_tokenizer(
        request.param, CORPUS, vocab_size=300 if request.param == "bpe" else None
    )


def stream(tok, text: str, stop=(), prompt: str = ""):
    """(deltas, detokenizer) for `text` fed token by token."""
    ids = tok.encode(text, add_special_tokens=False).ids
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    d = IncrementalDetokenizer(
        lambda x: tok.decode(x, skip_special_tokens=False), stop=stop, prompt_ids=prompt_ids
    )
    deltas = []
    for i in ids:
        deltas.append(d.add(i))
        if d.stopped:
            break
    else:
        deltas.append(d.flush())
    return deltas, d


def test_deltas_join_to_the_text_and_never_end_in_a_partial_character(tok):
    text = "héllo wörld! €uro 😀 smile"
    deltas, d = stream(tok, text, prompt="hello ")
    assert "".join(deltas) == text == d.text
    assert not any(REPLACEMENT in x for x in deltas)
    for x in deltas:
        x.encode("utf-8")  # a lone surrogate or broken char would raise


def test_byte_tokens_of_one_character_come_out_as_one_delta():
    tok = build_tokenizer("byte", "")
    deltas, _ = stream(tok, "a😀b")
    assert deltas == ["a", "", "", "", "😀", "b", ""]


def test_stop_sequence_spanning_tokens_is_cut_exactly(tok):
    deltas, d = stream(tok, "hello world, héllo", stop=["o w"])
    assert d.stopped and d.text == "hell" and "".join(deltas) == "hell"


def test_text_that_could_become_a_stop_is_held_back():
    tok = build_tokenizer("char", CORPUS)
    d = IncrementalDetokenizer(tok.decode, stop=["wörld"])
    out = [d.add(tok.token_to_id(c)) for c in "hello wö"]
    assert "".join(out) == "hello "  # "wö" may still become "wörld"
    assert d.add(tok.token_to_id("m")) == "wöm"  # it did not
    assert not d.stopped


def test_held_text_is_released_when_the_stream_ends():
    tok = build_tokenizer("char", CORPUS)
    deltas, d = stream(tok, "hello wo", stop=["world"])
    assert deltas[-1] == "wo" and d.text == "hello wo" and not d.stopped


def test_stop_inside_a_multibyte_character_split_across_byte_tokens():
    tok = build_tokenizer("byte", "")
    deltas, d = stream(tok, "price: 5€ and 😀 more", stop=["😀"])
    assert d.text == "price: 5€ and " and d.stopped
    deltas, d = stream(tok, "price: 5€ and 😀 more", stop=["5€ a"])
    assert d.text == "price: " and d.stopped


def test_the_earliest_stop_sequence_wins():
    tok = build_tokenizer("char", CORPUS)
    _, d = stream(tok, "hello world", stop=["world", "lo", "hello world"])
    assert d.text == "hel"


def test_overlapping_partial_match_is_not_lost():
    tok = build_tokenizer("char", CORPUS)
    _, d = stream(tok, "hhhello", stop=["hhe"])
    assert d.text == "h" and d.stopped


def test_a_character_cut_off_by_the_end_of_generation_is_dropped():
    tok = build_tokenizer("byte", "")
    ids = tok.encode("ok😀", add_special_tokens=False).ids[:-1]
    d = IncrementalDetokenizer(tok.decode)
    out = "".join(d.add(i) for i in ids) + d.flush()
    assert out == "ok"
