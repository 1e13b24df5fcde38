"""Token bins: built once, split at the tail, batches reproducible from the generator state."""

from __future__ import annotations

import numpy as np
import torch

from lmforge_worker.data import TokenBins, prepare_data
from lmforge_worker.tokenization import load_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40 + "héllo ∑\n"


def test_bins_hold_the_corpus_with_validation_at_the_end(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    info = prepare_data(
        corpus, tmp_path / "data", tokenizer="char", vocab_size=None, val_fraction=0.1
    )
    tok = load_tokenizer(info.tokenizer_path)
    ids = tok.encode(TEXT).ids
    assert info.train_tokens + info.val_tokens == len(ids) == len(TEXT)
    assert info.val_tokens == round(len(ids) * 0.1)
    assert info.dtype == "uint16" and info.vocab_size == len(set(TEXT)) + 1
    train = np.fromfile(tmp_path / "data/train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "data/val.bin", dtype=np.uint16)
    assert np.concatenate([train, val]).tolist() == ids
    assert tok.decode(val.tolist()) == TEXT[-info.val_tokens :]
    # No temp directories are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "data"]


def test_prepare_reuses_a_complete_build_and_is_deterministic(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    kw = dict(tokenizer="bpe", vocab_size=300, val_fraction=0.2)
    a = prepare_data(corpus, tmp_path / "a", **kw)
    b = prepare_data(corpus, tmp_path / "b", **kw)
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    corpus.write_text("changed", encoding="utf-8")
    assert prepare_data(corpus, tmp_path / "a", **kw) == a
    assert a.train_tokens == b.train_tokens


def test_batches_follow_the_generator_state(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    bins = TokenBins(
        prepare_data(corpus, tmp_path / "d", tokenizer="byte", vocab_size=None, val_fraction=0.1)
    )
    g = torch.Generator().manual_seed(7)
    bins.batch("train", 4, 16, g)
    state = g.get_state()
    x1, y1 = bins.batch("train", 4, 16, g)
    g2 = torch.Generator()
    g2.set_state(state)
    x2, y2 = bins.batch("train", 4, 16, g2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 16) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert bins.utf8_bytes(y1) == 4 * 16  # byte tokenizer: one byte per token
    evals = bins.fixed_batches("val", 2, 3, 8, seed=1)
    again = bins.fixed_batches("val", 2, 3, 8, seed=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(evals, again, strict=True))
