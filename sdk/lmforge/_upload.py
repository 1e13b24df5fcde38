"""Turning a path, bytes or a file object into the UploadDataset request stream."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from lmforge.v1 import training_pb2

CHUNK_BYTES = 1024 * 1024

#: What `datasets.upload` accepts.
UploadSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO
#: Called as `progress(bytes_sent, total_bytes)` after each chunk is handed to gRPC.
ProgressCallback = Callable[[int, int], None]


class PreparedUpload:
    """The content's name, size and sha256, and a way to read it again for each try."""

    def __init__(self, source: UploadSource, name: str | None, chunk_size: int = CHUNK_BYTES):
        self.chunk_size = chunk_size
        self._spool: BinaryIO | None = None
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            self._open: Callable[[], BinaryIO] = lambda: path.open("rb")
            default_name = path.name
        elif isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            self._open = lambda: io.BytesIO(data)
            default_name = ""
        elif hasattr(source, "read"):
            file_name = getattr(source, "name", "")  # an int for os.fdopen'd descriptors
            default_name = Path(file_name).name if isinstance(file_name, str) else ""
            if _seekable(source):
                start = source.tell()

                def reopen() -> BinaryIO:
                    source.seek(start)
                    return _NoClose(source)

                self._open = reopen
            else:  # a pipe or socket: keep a copy so a retry can send it again
                self._spool = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)
                while block := source.read(chunk_size):
                    self._spool.write(_as_bytes(block))
                spool = self._spool

                def rewind() -> BinaryIO:
                    spool.seek(0)
                    return _NoClose(spool)

                self._open = rewind
        else:
            raise TypeError(
                f"upload takes a path, bytes or a binary file, got {type(source).__name__}"
            )
        self.name = name if name is not None else default_name
        digest, size = hashlib.sha256(), 0
        with self._open() as f:
            while block := f.read(chunk_size):
                block = _as_bytes(block)
                digest.update(block)
                size += len(block)
        self.sha256, self.size = digest.hexdigest(), size

    def requests(self, progress: ProgressCallback | None = None) -> Iterator:
        """The request stream: the header, then the content in chunks."""
        header = training_pb2.UploadDatasetHeader(
            name=self.name, sha256=self.sha256, size_bytes=self.size
        )
        yield training_pb2.UploadDatasetRequest(header=header)
        sent = 0
        if progress:
            progress(0, self.size)
        with self._open() as f:
            while block := f.read(self.chunk_size):
                block = _as_bytes(block)
                yield training_pb2.UploadDatasetRequest(chunk=block)
                sent += len(block)
                if progress:
                    progress(sent, self.size)

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()


def _as_bytes(block: bytes | str) -> bytes:
    if isinstance(block, str):
        raise TypeError("upload needs a file opened in binary mode ('rb')")
    return bytes(block)


def _seekable(f: object) -> bool:
    try:
        return bool(f.seekable()) and f.tell() >= 0  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


class _NoClose:
    """A caller's file, read by a `with` block that must leave it open."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def read(self, n: int) -> bytes:
        return self._f.read(n)

    def __enter__(self) -> _NoClose:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
