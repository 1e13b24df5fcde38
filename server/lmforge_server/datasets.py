"""Dataset ingestion: an upload stream (a header, then chunks) to a content-addressed
artifact in the artifact store and a dataset record.

Hashing, UTF-8 decoding and writing run in a thread pool, never on the event loop. Nothing
half-written stays behind: the upload is received into a local temporary file and
published to the store (streamed, then its manifest) only once the content matched the
header's SHA-256.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import re
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from lmforge_server import errors
from lmforge_server import store as st
from lmforge_server.artifacts import TMP_PREFIX, ArtifactStore
from lmforge_server.jobs import check_name

SHA256_RE = re.compile(r"\A[0-9a-f]{64}\Z")


def check_dataset_id(value: str) -> str:
    if not value:
        raise errors.InvalidArgument("id: required")
    if not SHA256_RE.match(value):
        raise errors.NotFound(f"dataset {errors.shown(value)} not found")
    return value


class _Sink:
    """Counts, hashes, checks and writes the chunks of one upload (blocking calls)."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit = path, limit
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self.size = self.num_chars = 0
        self.chars: set[str] = set()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise errors.ResourceExhausted(
                f"chunk: upload exceeds the limit of {self.limit} bytes (max_upload_bytes)"
            )
        self.sha.update(chunk)
        try:
            text = self.decoder.decode(chunk)
        except UnicodeDecodeError as e:
            raise errors.InvalidArgument(
                f"chunk: not UTF-8 text (byte {self.size - len(chunk) + e.start})"
            ) from None
        self.num_chars += len(text)
        self.chars.update(text)
        self.file.write(chunk)

    def finish(self) -> str:
        self.file.close()
        try:
            self.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise errors.InvalidArgument("chunk: not UTF-8 text (truncated at the end)") from None
        if self.size == 0:
            raise errors.InvalidArgument("chunk: the dataset is empty")
        return self.sha.hexdigest()


def check_header(header, limit: int) -> None:
    check_name("name", header.name)
    if not SHA256_RE.match(header.sha256):
        raise errors.InvalidArgument("sha256: must be 64 lowercase hex characters")
    if header.size_bytes < 0:
        raise errors.InvalidArgument("size_bytes: must not be negative")
    if header.size_bytes > limit:
        raise errors.ResourceExhausted(
            f"size_bytes: {header.size_bytes} exceeds the limit of {limit} bytes (max_upload_bytes)"
        )


@dataclass(frozen=True)
class Quota:
    max_upload_bytes: int
    max_datasets: int = 0
    max_bytes: int = 0


async def ingest(
    store: st.Store, artifacts: ArtifactStore, pool: Executor, quota: Quota, owner: str, requests
) -> st.DatasetRecord:
    """Consumes an upload stream of UploadDatasetRequest messages; returns the record."""
    limit = quota.max_upload_bytes
    loop = asyncio.get_running_loop()
    tmp_dir = artifacts.scratch_dir / "uploads"
    await loop.run_in_executor(pool, lambda: tmp_dir.mkdir(parents=True, exist_ok=True))
    tmp = tmp_dir / f"{TMP_PREFIX}{st.new_id('upload')}"
    header = None
    sink = await loop.run_in_executor(pool, _Sink, tmp, limit)
    try:
        async for req in requests:
            part = req.WhichOneof("part")
            if header is None:
                if part != "header":
                    raise errors.InvalidArgument(
                        "header: the first message must be the upload header"
                    )
                header = req.header
                check_header(header, limit)
            elif part != "chunk":
                raise errors.InvalidArgument("header: sent twice; send it once")
            else:
                await loop.run_in_executor(pool, sink.write, req.chunk)
        if header is None:
            raise errors.InvalidArgument("header: missing")
        digest = await loop.run_in_executor(pool, sink.finish)
        if digest != header.sha256:
            raise errors.InvalidArgument(
                f"sha256: content hashes to {digest}, header says {header.sha256}"
            )
        if header.size_bytes and header.size_bytes != sink.size:
            raise errors.InvalidArgument(
                f"size_bytes: header says {header.size_bytes}, received {sink.size}"
            )

        def commit() -> st.DatasetRecord:
            sink.file.close()
            key = artifacts.put_dataset(owner, digest, tmp)
            rec = st.DatasetRecord(
                id=digest,
                owner=owner,
                name=header.name or digest[:12],
                sha256=digest,
                size_bytes=sink.size,
                num_chars=sink.num_chars,
                num_distinct_chars=len(sink.chars),
                created_at=time.time(),
                path=key,
            )
            return store.put_dataset(
                rec, max_datasets=quota.max_datasets, max_bytes=quota.max_bytes
            )

        return await loop.run_in_executor(pool, commit)
    finally:

        def cleanup() -> None:
            sink.file.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

        await loop.run_in_executor(pool, cleanup)
