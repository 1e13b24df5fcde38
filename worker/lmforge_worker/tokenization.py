"""Tokenizers for training: byte-level BPE, characters, or raw bytes, saved as tokenizer.json.

All three come from the `tokenizers` library, so the inference server loads any of them with
`Tokenizer.from_file` and decodes with `tokenizer.decode(ids)` exactly. Every tokenizer ends
with one special token, EOS_TOKEN, as its last id.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, trainers
from tokenizers.pre_tokenizers import ByteLevel

from lmforge_server.artifacts import write_file_atomic
from lmforge_server.specs import BYTE_VOCAB, EOS_TOKEN

KINDS = ("bpe", "char", "byte")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of ByteLevel pre-tokenizers."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_TO_CHAR = _bytes_to_unicode()


def _chunks(text: str, size: int = 1 << 20) -> Iterator[str]:
    # Cut at newlines so the BPE trainer never sees a word split in two.
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def build_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer of `kind` for `text`, with EOS_TOKEN as its last id.

    - "bpe": byte-level BPE trained on `text` with at most `vocab_size` ids in all (fewer when
      the corpus runs out of merges); encodes any text.
    - "char": the distinct characters of `text` sorted by code point (ids 0..n-1), EOS at n;
      characters not in `text` are dropped when encoding. `vocab_size`, when given, must be n+1.
    - "byte": ids 0..255 are the bytes, EOS at 256; round-trips any UTF-8 text, and decoding
      an incomplete multi-byte character gives U+FFFD. `vocab_size`, when given, must be 257.

    Decoding concatenates exactly (no added spaces); `decode(encode(s)) == s` for any text
    the tokenizer covers. Raises ValueError for an unknown kind or a mismatched vocab_size.
    """
    if kind == "char":
        chars = sorted(set(text))
        if vocab_size is not None and vocab_size != len(chars) + 1:
            raise ValueError(
                f"char tokenizer: the corpus has {len(chars)} distinct characters, so the vocab "
                f"size is {len(chars) + 1}, not {vocab_size}"
            )
        # A BPE model without merges splits a word into characters and looks each one up;
        # with no unk token, a character it does not know is dropped rather than failing.
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
        tok.decoder = decoders.Fuse()
    elif kind == "byte":
        if vocab_size is not None and vocab_size != BYTE_VOCAB:
            raise ValueError(f"byte tokenizer: the vocab size is {BYTE_VOCAB}, not {vocab_size}")
        vocab = {_BYTE_TO_CHAR[b]: b for b in range(256)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
    elif kind == "bpe":
        if vocab_size is None or vocab_size < BYTE_VOCAB + 1:
            raise ValueError(f"bpe tokenizer: vocab_size must be at least {BYTE_VOCAB + 1}")
        tok = Tokenizer(models.BPE())
        # No prefix space: decode(encode(s)) must give back s exactly.
        tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 1,
            initial_alphabet=ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(_chunks(text), trainer=trainer)
    else:
        raise ValueError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}")
    tok.add_special_tokens([EOS_TOKEN])
    assert tok.token_to_id(EOS_TOKEN) == tok.get_vocab_size() - 1
    return tok


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Writes tokenizer.json atomically (temp file, fsync, rename)."""
    path = Path(path)
    write_file_atomic(path, tok.to_str().encode("utf-8"))
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer.json (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    return Tokenizer.from_file(str(path))


def eos_token_id(tok: Tokenizer) -> int:
    """The id of EOS_TOKEN; for a pretrained tokenizer without it, the last id."""
    eos = tok.token_to_id(EOS_TOKEN)
    return tok.get_vocab_size() - 1 if eos is None else eos


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each id stands for (special tokens: 0), for bits per byte."""
    n = tok.get_vocab_size()
    lengths = np.zeros(n, dtype=np.int64)
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if token in specials:
            continue
        if byte_level:
            # Each character of a byte-level token is one byte of text.
            lengths[i] = len(token)
        else:
            lengths[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return lengths
