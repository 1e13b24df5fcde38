"""The corpus as token bins: tokenizer + train/val token arrays on disk, and batch sampling.

`prepare_data` encodes the corpus once into `<data_dir>/{tokenizer.json, train.bin, val.bin,
meta.json}` (built in a temp directory, then renamed into place, so a crash never leaves a
half-built one) and later calls reuse it. Batches are drawn with a `torch.Generator`, whose
state is all a checkpoint needs to resume the data stream bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge_worker.tokenization import (
    build_tokenizer,
    eos_token_id,
    load_tokenizer,
    save_tokenizer,
    token_byte_lengths,
)

META_VERSION = 1


@dataclass(frozen=True)
class DataInfo:
    """What `prepare_data` built: where the files are and how many tokens each split holds."""

    data_dir: Path
    tokenizer_path: Path
    train_tokens: int
    val_tokens: int
    vocab_size: int
    eos_token_id: int
    dtype: str


def _encode_to_file(tok: Tokenizer, text: str, path: Path, dtype: np.dtype) -> int:
    # Encode in newline-aligned pieces (parallel in the tokenizers library) and stream them
    # out, so a large corpus never holds all its ids as Python ints at once.
    pieces, start, size = [], 0, 1 << 16
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append((start, end))
        start = end
    n = 0
    with open(path, "wb") as f:
        for i in range(0, len(pieces), 64):
            group = [text[a:b] for a, b in pieces[i : i + 64]]
            for enc in tok.encode_batch(group, add_special_tokens=False):
                arr = np.asarray(enc.ids, dtype=dtype)
                f.write(arr.tobytes())
                n += len(arr)
        f.flush()
        os.fsync(f.fileno())
    return n


def prepare_data(
    corpus_path: Path,
    data_dir: Path,
    *,
    tokenizer: str,
    vocab_size: int | None,
    val_fraction: float,
    pretrained_tokenizer: Path | None = None,
    val_corpus_path: Path | None = None,
) -> DataInfo:
    """Builds (or reuses) the tokenizer and train/val token bins for a corpus in `data_dir`.

    The tokenizer is `pretrained_tokenizer` (a tokenizer.json) when given, else one of kind
    `tokenizer` trained on the corpus (see `build_tokenizer`). The corpus is encoded in order;
    the last `val_fraction` of its tokens are validation, or, with `val_corpus_path`, all
    of that corpus (encoded by the same tokenizer) and none of this one. Deterministic; if `data_dir`
    already holds a complete build it is returned as is.
    """
    data_dir = Path(data_dir)
    if (data_dir / "meta.json").exists():
        return _read_info(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=data_dir.parent, prefix=f".{data_dir.name}.tmp-"))
    try:
        text = Path(corpus_path).read_text(encoding="utf-8", errors="replace")
        if pretrained_tokenizer is not None:
            tok = load_tokenizer(pretrained_tokenizer)
        else:
            tok = build_tokenizer(tokenizer, text, vocab_size)
        save_tokenizer(tok, tmp / "tokenizer.json")
        vocab = tok.get_vocab_size()
        dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
        n = _encode_to_file(tok, text, tmp / "all.bin", dtype)
        n_val = int(round(n * val_fraction))
        if val_corpus_path is not None:
            val_text = Path(val_corpus_path).read_text(encoding="utf-8", errors="replace")
            # Appended after the training text: the split below then takes exactly it.
            n_val = _encode_to_file(tok, val_text, tmp / "val-only.bin", dtype)
            with open(tmp / "all.bin", "ab") as f:
                f.write((tmp / "val-only.bin").read_bytes())
            (tmp / "val-only.bin").unlink()
            n += n_val
        all_ids = np.memmap(tmp / "all.bin", dtype=dtype, mode="r")
        for name, arr in (("train.bin", all_ids[: n - n_val]), ("val.bin", all_ids[n - n_val :])):
            with open(tmp / name, "wb") as f:
                f.write(np.ascontiguousarray(arr).tobytes())
                f.flush()
                os.fsync(f.fileno())
        del all_ids
        (tmp / "all.bin").unlink()
        meta = {
            "version": META_VERSION,
            "train_tokens": n - n_val,
            "val_tokens": n_val,
            "vocab_size": vocab,
            "eos_token_id": eos_token_id(tok),
            "dtype": dtype.name,
            "corpus_bytes": len(text.encode("utf-8")),
        }
        # meta.json last: its presence marks a complete build.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, data_dir)
        except OSError:
            # Someone else finished first (rename onto a non-empty directory fails): use theirs.
            if not (data_dir / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _read_info(data_dir)


def _read_info(data_dir: Path) -> DataInfo:
    meta = json.loads((data_dir / "meta.json").read_text())
    return DataInfo(
        data_dir=data_dir,
        tokenizer_path=data_dir / "tokenizer.json",
        train_tokens=meta["train_tokens"],
        val_tokens=meta["val_tokens"],
        vocab_size=meta["vocab_size"],
        eos_token_id=meta["eos_token_id"],
        dtype=meta["dtype"],
    )


class TokenBins:
    """Memory-mapped train/val tokens with batch sampling for next-token prediction."""

    def __init__(self, info: DataInfo):
        self.info = info
        dtype = np.dtype(info.dtype)
        self.splits = {
            name: np.memmap(info.data_dir / f"{name}.bin", dtype=dtype, mode="r")
            for name in ("train", "val")
        }
        self.byte_lengths = token_byte_lengths(load_tokenizer(info.tokenizer_path))

    def check_context(self, context_length: int) -> None:
        """Raises ValueError when a split is too short for one sequence of this length."""
        for name, arr in self.splits.items():
            if len(arr) < context_length + 1:
                raise ValueError(
                    f"the {name} split has {len(arr)} tokens; it needs at least "
                    f"{context_length + 1} for context length {context_length} "
                    "(use a longer corpus, a shorter context or a larger val_fraction)"
                )

    def batch(
        self, split: str, batch_size: int, context_length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [batch_size, context_length] (int64) at random offsets.

        The offsets come from `generator` alone, so the same generator state gives the same
        batch.
        """
        arr = self.splits[split]
        starts = torch.randint(len(arr) - context_length, (batch_size,), generator=generator)
        rows = np.stack([arr[s : s + context_length + 1] for s in starts.tolist()])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def fixed_batches(
        self, split: str, n: int, batch_size: int, context_length: int, seed: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same `n` batches for a given seed every time (evaluation)."""
        g = torch.Generator().manual_seed(seed)
        return [self.batch(split, batch_size, context_length, g) for _ in range(n)]

    def utf8_bytes(self, targets: torch.Tensor) -> int:
        """UTF-8 bytes of text the target tokens stand for (for bits per byte)."""
        return int(self.byte_lengths[targets.numpy()].sum())
