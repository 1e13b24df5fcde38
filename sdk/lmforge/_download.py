"""Writes a DownloadModel stream into a directory, checking every file's size and sha256.

No I/O on the network here: the sync and async clients feed it the messages they receive.
Each file is written under a temporary name and renamed only once its sha256 matches.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lmforge import errors


class ModelDirWriter:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self._file = None
        self._name = ""

    def feed(self, chunk) -> None:
        """One ModelFileChunk message."""
        if chunk.offset == 0:
            self._close_file()
            if not chunk.name or "/" in chunk.name or chunk.name.startswith("."):
                raise errors.LmforgeError(f"the server sent a bad file name {chunk.name!r}")
            self._name, self._size, self._sha256 = chunk.name, chunk.size_bytes, chunk.sha256
            self._hash, self._written = hashlib.sha256(), 0
            self._tmp = self.dir / f".{chunk.name}.part"
            self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in _close_file)
        elif chunk.name != self._name or chunk.offset != self._written:
            raise errors.LmforgeError(f"chunk of {chunk.name!r} at {chunk.offset} out of order")
        self._file.write(chunk.data)
        self._hash.update(chunk.data)
        self._written += len(chunk.data)

    def _close_file(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._written != self._size or self._hash.hexdigest() != self._sha256:
            self._tmp.unlink(missing_ok=True)
            raise errors.LmforgeError(
                f"{self._name}: received {self._written} bytes with sha256 "
                f"{self._hash.hexdigest()}; the server announced {self._size} and {self._sha256}"
            )
        final = self.dir / self._name
        os.replace(self._tmp, final)
        self.paths.append(final)

    def finish(self) -> list[Path]:
        """Checks and renames the last file; returns every file written."""
        self._close_file()
        return self.paths

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)
