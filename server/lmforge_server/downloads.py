"""DownloadModel: a READY model's files as a stream of chunks, each file with its sha256."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from lmforge_server import errors
from lmforge_server import store as st
from lmforge_server.artifacts import ArtifactStore

CHUNK_BYTES = 1 << 20


def model_files(store: st.Store, artifacts: ArtifactStore, owner: str, ref: str) -> list[Path]:
    """The files of the owner's model `ref`, in name order (fetched from the artifact store
    into this server's cache when the store is remote).

    Raises NotFound for a model the owner does not have, Conflict for one not READY.
    """
    rec = store.get_model(owner, ref)
    if rec.state != st.MODEL_READY or not rec.path:
        raise st.Conflict(
            f"model {errors.shown(ref)} is {rec.state.lower()}; only ready models download"
        )
    root = artifacts.local_dir(rec.path)
    # Names come from the registry, written by the worker; keep to plain files in the dir.
    return [root / n for n in sorted(rec.files) if "/" not in n and (root / n).is_file()]


def _sha256(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def file_chunks(paths: list[Path], chunk_bytes: int = CHUNK_BYTES) -> Iterator[dict]:
    """Chunks as dicts of DownloadModel's fields: a file's first chunk carries its size and
    sha256; every chunk its name and offset. An empty file still sends one chunk."""
    for path in paths:
        digest, size = _sha256(path)
        with open(path, "rb") as f:
            offset = 0
            while True:
                data = f.read(chunk_bytes)
                first = offset == 0
                yield {
                    "name": path.name,
                    "size_bytes": size if first else 0,
                    "sha256": digest if first else "",
                    "offset": offset,
                    "data": data,
                }
                offset += len(data)
                if offset >= size or not data:  # a file cut short ends, checked by sha256
                    break
