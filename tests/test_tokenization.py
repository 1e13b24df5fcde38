"""Tokenizers: exact decoding, EOS as the last id, vocab sizes the spec expects."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge_server.specs import BYTE_VOCAB, EOS_TOKEN, derived_vocab_size
from lmforge_worker.tokenization import (
    build_tokenizer,
    eos_token_id,
    load_tokenizer,
    save_tokenizer,
    token_byte_lengths,
)

CORPUS = Path(__file__).resolve().parents[1] / "server/lmforge_server/data/tinyshakespeare.txt"
TEXT = CORPUS.read_text(encoding="utf-8")[:20000]
ODD = "héllo, 世界 🎉\n\n\t  x\r\n\x00 ünïcödé  ∑ end"


def test_char_tokenizer_is_the_sorted_characters_then_eos():
    text = TEXT + ODD
    chars = sorted(set(text))
    tok = build_tokenizer("char", text, derived_vocab_size("char", len(chars)))
    assert tok.get_vocab_size() == len(chars) + 1
    assert [tok.token_to_id(c) for c in chars] == list(range(len(chars)))
    assert eos_token_id(tok) == len(chars) == tok.token_to_id(EOS_TOKEN)
    # One token per character, newlines and spaces included; decoding adds nothing.
    ids = tok.encode(ODD).ids
    assert ids == [chars.index(c) for c in ODD]
    assert tok.decode(ids) == ODD
    assert tok.encode(tok.decode(ids)).ids == ids
    assert tok.decode([chars.index(" "), chars.index(" "), chars.index("\n")]) == "  \n"


def test_char_tokenizer_rejects_a_vocab_size_that_does_not_match_the_corpus():
    with pytest.raises(ValueError, match="distinct characters"):
        build_tokenizer("char", "abc", 10)


def test_char_tokenizer_drops_characters_it_never_saw():
    tok = build_tokenizer("char", "abc")
    assert tok.decode(tok.encode("aZb").ids) == "ab"


def test_byte_tokenizer_round_trips_any_utf8_and_marks_cut_characters():
    tok = build_tokenizer("byte", "", BYTE_VOCAB)
    assert tok.get_vocab_size() == BYTE_VOCAB == eos_token_id(tok) + 1
    ids = tok.encode(ODD).ids
    assert ids == list(ODD.encode("utf-8"))
    assert tok.decode(ids) == ODD
    world = list("世".encode())
    assert tok.decode(world[:2]) == "\ufffd"
    assert tok.decode([*list(b"ok"), *world]) == "ok世"


def test_bpe_tokenizer_round_trips_and_has_eos_last():
    tok = build_tokenizer("bpe", TEXT, 400)
    assert tok.get_vocab_size() == 400
    assert eos_token_id(tok) == 399
    for s in (TEXT[:3000], ODD, "  two leading spaces", "\n\nnewlines\n"):
        assert tok.decode(tok.encode(s).ids) == s
    # It learned merges: fewer tokens than bytes.
    assert len(tok.encode(TEXT[:3000]).ids) < len(TEXT[:3000].encode()) * 0.7


def test_bpe_vocab_is_capped_by_what_the_corpus_can_merge():
    tok = build_tokenizer("bpe", "ab ab ab", 1000)
    assert tok.get_vocab_size() < 1000
    assert eos_token_id(tok) == tok.get_vocab_size() - 1


def test_saved_tokenizer_loads_and_decodes_the_same(tmp_path):
    for kind, size in (("char", None), ("byte", None), ("bpe", 300)):
        tok = build_tokenizer(kind, TEXT, size)
        path = save_tokenizer(tok, tmp_path / kind / "tokenizer.json")
        again = load_tokenizer(path.parent)
        ids = tok.encode(TEXT[:500]).ids
        assert again.encode(TEXT[:500]).ids == ids
        assert again.decode(ids) == TEXT[:500]
        assert eos_token_id(again) == eos_token_id(tok)


def test_token_byte_lengths_sum_to_the_utf8_length():
    text = TEXT[:2000] + ODD
    for kind, size in (("char", None), ("byte", None), ("bpe", 300)):
        tok = build_tokenizer(kind, text, size)
        lengths = token_byte_lengths(tok)
        assert lengths[eos_token_id(tok)] == 0
        ids = tok.encode(text).ids
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="one of"):
        build_tokenizer("words", TEXT)
