"""A size-bounded LRU cache on local disk of artifacts published in an object store.

`fetch(prefix)` downloads the files of the prefix's manifest once, verifies every size and
sha256 against it, and returns a local directory. A later fetch of the same version checks
the cached files against the manifest again and downloads only those that no longer match.
Entries past the size bound are evicted, least recently used first.

Several processes on one host may share a cache directory: each entry has a lock file
(fcntl.flock), so two fetches of one artifact download it once, and eviction skips an
entry another process is fetching.

Layout: <dir>/entries/<key>/{<files>, .manifest.json, .used}, <dir>/locks/<key>.lock,
where <key> is a hash of the store URL, the prefix and the version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge_server.objectstore import (
    CHUNK,
    TMP_PREFIX,
    Manifest,
    ManifestEntry,
    ObjectStore,
    write_file_atomic,
)

if TYPE_CHECKING:
    from lmforge_server.settings import Settings

MANIFEST_COPY = ".manifest.json"
USED_MARK = ".used"


class ArtifactNotFound(LookupError):
    """The store has no manifest at the prefix: nothing was published there."""


class ArtifactCorrupt(IOError):
    """An object in the store does not match its manifest's size or sha256."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(path: Path, entry: ManifestEntry) -> bool:
    try:
        if path.stat().st_size != entry.size:
            return False
    except FileNotFoundError:
        return False
    return file_sha256(path) == entry.sha256


@dataclass
class CacheStats:
    # Files downloaded from the store by this process (a hit downloads none).
    downloads: int = 0
    hits: int = 0
    evictions: int = 0


class ArtifactCache:
    def __init__(self, store: ObjectStore, directory: Path | str, max_bytes: int):
        self.store = store
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        (self.dir / "entries").mkdir(parents=True, exist_ok=True)
        (self.dir / "locks").mkdir(parents=True, exist_ok=True)

    def fetch(self, prefix: str) -> Path:
        """A local directory holding the files of `prefix`'s published manifest, verified.

        Raises ArtifactNotFound when nothing is published there, ArtifactCorrupt when the
        store's objects differ from the manifest.
        """
        manifest = self.store.open_manifest(prefix)
        if manifest is None:
            raise ArtifactNotFound(f"no artifact is published at {prefix!r}")
        return self.fetch_manifest(manifest)

    def fetch_manifest(self, manifest: Manifest) -> Path:
        key = self._key(manifest)
        entry = self.dir / "entries" / key
        with self._lock(key, blocking=True):
            self._fill(entry, manifest)
            now = time.time_ns()  # explicit: file timestamps tick only every few ms
            os.utime(entry / USED_MARK, ns=(now, now))
        self._evict(keep=key)
        return entry

    def _key(self, manifest: Manifest) -> str:
        ident = f"{self.store.url}\n{manifest.prefix}\n{manifest.version}"
        return hashlib.sha256(ident.encode()).hexdigest()[:32]

    @contextlib.contextmanager
    def _lock(self, key: str, *, blocking: bool) -> Iterator[bool]:
        # Lock files stay: removing one while another process waits on it would let two
        # processes hold "the" lock on two different inodes.
        fd = os.open(self.dir / "locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _fill(self, entry: Path, manifest: Manifest) -> None:
        """Makes `entry` hold exactly the manifest's files; called under the entry's lock."""
        complete = (entry / MANIFEST_COPY).exists()
        entry.mkdir(parents=True, exist_ok=True)
        for stale in entry.rglob(f"{TMP_PREFIX}*"):  # a fetch killed mid-download
            stale.unlink(missing_ok=True)
        fetched_any = False
        for file in manifest.files:
            path = entry / file.name
            if complete and _matches(path, file):
                continue
            got = self.store.get(manifest.key(file.name), path)
            self.stats.downloads += 1
            fetched_any = True
            if (got.size, got.sha256) != (file.size, file.sha256):
                path.unlink(missing_ok=True)
                raise ArtifactCorrupt(
                    f"{manifest.key(file.name)} has size {got.size} and sha256 {got.sha256}; "
                    f"its manifest says {file.size} and {file.sha256}"
                )
        if not fetched_any:
            self.stats.hits += 1
        if not complete:
            write_file_atomic(entry / MANIFEST_COPY, manifest.to_json())
        (entry / USED_MARK).touch()

    def _evict(self, keep: str) -> None:
        """Removes least recently used entries until the cache fits its bound."""
        entries = []
        for entry in (self.dir / "entries").iterdir():
            try:
                manifest = Manifest.from_json((entry / MANIFEST_COPY).read_bytes(), "")
                used = (entry / USED_MARK).stat().st_mtime
            except (FileNotFoundError, ValueError):
                continue  # being filled by another process
            entries.append((used, entry.name, manifest.total_size))
        total = sum(size for _, _, size in entries)
        for _, key, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if key == keep:
                continue  # one artifact larger than the bound is still served
            with self._lock(key, blocking=False) as locked:
                if not locked:
                    continue  # another process is fetching or verifying it
                shutil.rmtree(self.dir / "entries" / key, ignore_errors=True)
            total -= size
            self.stats.evictions += 1


def open_artifact_cache(store: ObjectStore, settings: Settings) -> ArtifactCache:
    """The settings' cache (directory and size bound) in front of `store`."""
    return ArtifactCache(store, settings.artifact_cache_dir, settings.artifact_cache_max_bytes)
