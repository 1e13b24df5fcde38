"""Object stores for artifacts: a local directory or any fsspec URL (s3://bucket/prefix).

An artifact is published all at once: its files go under a fresh version prefix
(`<prefix>/v-<utc time>-<random>/<name>`), then `<prefix>/manifest.json` (names, sizes,
sha256s and the version) is written last, in one PUT or one rename. Readers trust only a
manifest, so a writer killed half-way leaves objects no reader looks at, and `sweep`
removes them once they are older than a bound. Publishing a prefix again writes a new
version and replaces the manifest; the old version stays readable until swept.

fsspec's async filesystems are not fork-safe (filesystem_spec#755, s3fs#889): a store
creates its filesystem lazily, in the process that uses it, and again after a fork.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from lmforge_server.settings import Settings

# Names of files being written: never read, removed by the next writer or the sweep.
TMP_PREFIX = ".tmp-"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
CHUNK = 1 << 20
# S3 parts may not be smaller than 5 MiB (except the last).
MIN_BLOCK_SIZE = 5 << 20
# A version prefix: when its writer started (UTC, for the sweep) and a nonce.
VERSION_RE = re.compile(r"^v-(\d{8}T\d{6}Z)-[0-9a-f]{12}$")

Source = Path | str | BinaryIO


class ManifestError(ValueError):
    """A manifest that cannot be parsed, or names files it should not."""


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a reader may trust: the files of one published version of a prefix."""

    prefix: str
    version: str
    created: float
    files: tuple[ManifestEntry, ...]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def key(self, name: str) -> str:
        """The object key that holds file `name` of this version."""
        return f"{self.prefix}/{self.version}/{name}"

    def to_json(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "prefix": self.prefix,
            "version": self.version,
            "created": self.created,
            "files": [asdict(f) for f in self.files],
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, prefix: str) -> Manifest:
        try:
            doc = json.loads(raw)
            if doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {MANIFEST_FORMAT}")
            files = tuple(
                ManifestEntry(str(f["name"]), int(f["size"]), str(f["sha256"]))
                for f in doc["files"]
            )
            manifest = cls(prefix, str(doc["version"]), float(doc["created"]), files)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"manifest of {prefix!r} is malformed: {e}") from e
        if not VERSION_RE.match(manifest.version):
            raise ManifestError(f"manifest of {prefix!r} names version {manifest.version!r}")
        for f in files:
            _check_name(f.name)
        return manifest


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    # Seconds since the epoch when the backend reports it.
    mtime: float | None = None


def write_file_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to `path` so a reader sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; other services read these files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _bad_parts(path: str) -> bool:
    parts = path.split("/")
    return any(p in ("", ".", "..") or p.startswith(".") for p in parts) or any(
        VERSION_RE.match(p) for p in parts
    )


def _check_name(name: str) -> None:
    if not name or _bad_parts(name):
        raise ManifestError(
            f"file name {name!r} must be a relative path without empty, dot or version parts"
        )


def check_prefix(prefix: str) -> str:
    """`prefix` without outer slashes; ValueError when it could collide with store internals."""
    prefix = prefix.strip("/")
    if not prefix or _bad_parts(prefix) or prefix.split("/")[-1] == MANIFEST_NAME:
        raise ValueError(
            f"prefix {prefix!r} must be a relative key path without empty, dot, version "
            "or manifest parts"
        )
    return prefix


def _nonempty(prefix: str) -> str:
    if not prefix.strip("/"):
        raise ValueError("refusing to delete the whole store: the prefix is empty")
    return prefix


def _new_version() -> str:
    return f"v-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(6)}"


def _version_started(version: str) -> float:
    return float(calendar.timegm(time.strptime(VERSION_RE.match(version)[1], "%Y%m%dT%H%M%SZ")))


@contextlib.contextmanager
def _open_source(src: Source) -> Iterator[BinaryIO]:
    if isinstance(src, (str, Path)):
        with open(src, "rb") as f:
            yield f
    else:
        yield src


def _copy_hashing(src: BinaryIO, dst: BinaryIO, chunk: int = CHUNK) -> ManifestEntry:
    """Copies in chunks (never the whole stream in memory); returns size and sha256."""
    digest, size = hashlib.sha256(), 0
    while data := src.read(chunk):
        digest.update(data)
        size += len(data)
        dst.write(data)
    return ManifestEntry("", size, digest.hexdigest())


class ObjectStore(ABC):
    """Keys are relative, slash-separated paths under the store's root."""

    url: str

    # -- backend primitives ------------------------------------------------------------

    @abstractmethod
    @contextlib.contextmanager
    def _writer(self, key: str) -> Iterator[BinaryIO]:
        """A file whose content appears at `key` whole when the block ends without error."""

    @abstractmethod
    def _reader(self, key: str) -> BinaryIO:
        """`key` opened for streamed reading; FileNotFoundError when absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under `prefix`, recursively, sorted by key."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Removes every object under `prefix` (nothing there is not an error)."""

    # -- objects -----------------------------------------------------------------------

    def put(self, key: str, src: Source) -> ManifestEntry:
        """Streams a file or binary stream to `key`; returns its size and sha256."""
        with _open_source(src) as f, self._writer(key) as out:
            info = _copy_hashing(f, out)
        return ManifestEntry(key, info.size, info.sha256)

    def get(self, key: str, dest: Path | str) -> ManifestEntry:
        """Streams `key` to the local file `dest` (replaced whole); returns size and sha256."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f"{TMP_PREFIX}{dest.name}.")
        try:
            with os.fdopen(fd, "wb") as out, contextlib.closing(self._reader(key)) as f:
                info = _copy_hashing(f, out, self._read_chunk)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return ManifestEntry(key, info.size, info.sha256)

    def read_bytes(self, key: str) -> bytes | None:
        """A small object's content, or None when there is none."""
        try:
            with contextlib.closing(self._reader(key)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    _read_chunk = CHUNK

    # -- published artifacts -----------------------------------------------------------

    def publish(self, prefix: str, files: Mapping[str, Source]) -> Manifest:
        """Uploads `files` ({name: path or stream}) as a new version of `prefix`, then its
        manifest; readers see the old version or the new one, never a part."""
        prefix = check_prefix(prefix)
        for name in files:
            _check_name(name)
        version = _new_version()
        entries = []
        for name in sorted(files):
            info = self.put(f"{prefix}/{version}/{name}", files[name])
            entries.append(ManifestEntry(name, info.size, info.sha256))
        manifest = Manifest(prefix, version, time.time(), tuple(entries))
        self.put(f"{prefix}/{MANIFEST_NAME}", io.BytesIO(manifest.to_json()))
        return manifest

    def open_manifest(self, prefix: str) -> Manifest | None:
        """The published manifest of `prefix`, or None when nothing was published there."""
        prefix = check_prefix(prefix)
        raw = self.read_bytes(f"{prefix}/{MANIFEST_NAME}")
        return None if raw is None else Manifest.from_json(raw, prefix)

    def sweep(self, older_than_s: float, under: str = "") -> list[str]:
        """Removes versions no manifest names (killed or superseded writers) whose last
        object is older than `older_than_s`, and temporaries of killed local writes;
        returns the prefixes and keys removed.

        The bound must exceed the longest publish, or a slow writer loses its objects.
        """
        versions: dict[tuple[str, str], float] = {}
        manifests: set[str] = set()
        partials: list[ObjectInfo] = []
        for obj in self.list(under):
            parts = obj.key.split("/")
            at = next((i for i, p in enumerate(parts) if VERSION_RE.match(p)), None)
            if at is None:
                if parts[-1] == MANIFEST_NAME:
                    manifests.add("/".join(parts[:-1]))
                elif parts[-1].startswith(TMP_PREFIX) and obj.mtime is not None:
                    partials.append(obj)  # e.g. a manifest write killed before its rename
                continue
            group = ("/".join(parts[:at]), parts[at])
            touched = max(obj.mtime or 0.0, _version_started(parts[at]))
            versions[group] = max(versions.get(group, 0.0), touched)
        current: dict[str, str | None] = {}
        for prefix in manifests:
            try:
                manifest = self.open_manifest(prefix)
            except ValueError:
                current[prefix] = ""  # unreadable, or not ours: keep every version under it
                continue
            current[prefix] = manifest.version if manifest else None
        removed = []
        deadline = time.time() - older_than_s
        for (prefix, version), touched in sorted(versions.items()):
            if current.get(prefix) in (version, "") or touched > deadline:
                continue
            self.delete_prefix(f"{prefix}/{version}")
            removed.append(f"{prefix}/{version}")
        for obj in partials:
            if obj.mtime < deadline:
                self.delete_prefix(obj.key)
                removed.append(obj.key)
        return removed


class LocalObjectStore(ObjectStore):
    """A directory: objects are files, written to a temporary name and renamed."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key.strip("/")

    @contextlib.contextmanager
    def _writer(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
        try:
            os.fchmod(fd, 0o644)  # mkstemp makes 0600; other services read these files
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _reader(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            st = base.stat()
            return [ObjectInfo(prefix.strip("/"), st.st_size, st.st_mtime)]
        found = []
        for dirpath, _, names in os.walk(base):
            for name in names:
                path = Path(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    key = path.relative_to(self.root).as_posix()
                    found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return sorted(found, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(_nonempty(prefix))
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class FsspecObjectStore(ObjectStore):
    """Any fsspec URL (`s3://bucket/prefix`, `gs://…`, `memory://…`).

    The filesystem is created on first use in each process (never at import or in
    `__init__`), so a store built before a fork works in the child.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        block_size: int = 8 << 20,
    ):
        import fsspec.core

        self.url = url.rstrip("/")
        self.protocol, _ = fsspec.core.split_protocol(self.url)
        self._fs_class = fsspec.get_filesystem_class(self.protocol)  # a class: no client yet
        self._root = self._fs_class._strip_protocol(self.url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        # Multipart parts (S3) and ranged reads are this big.
        self.block_size = max(block_size, MIN_BLOCK_SIZE)
        self._read_chunk = self.block_size
        self._fs = None
        self._fs_pid: int | None = None

    @property
    def fs(self):
        """This process's filesystem, created here on first use."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs = self._fs_class(skip_instance_cache=True, **self.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def _path(self, key: str) -> str:
        key = key.strip("/")
        return f"{self._root}/{key}" if key else self._root

    @contextlib.contextmanager
    def _writer(self, key: str) -> Iterator[BinaryIO]:
        # Past one block, s3fs switches to a multipart upload of block-sized parts; the
        # object appears only when the upload completes on close.
        f = self.fs.open(self._path(key), "wb", block_size=self.block_size)
        try:
            yield f
        except BaseException:
            f.discard()  # abort the multipart upload: no partial object
            f.closed = True
            raise
        f.close()

    def _reader(self, key: str) -> BinaryIO:
        # No read-ahead cache: each read of one block is one ranged GET.
        return self.fs.open(self._path(key), "rb", block_size=self.block_size, cache_type="none")

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        root = self._root + "/"
        objects = []
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            mtime = info.get("LastModified") or info.get("mtime") or info.get("created")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            key = path[len(root) :] if path.startswith(root) else path
            objects.append(ObjectInfo(key, int(info.get("size") or 0), mtime))
        return sorted(objects, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(_nonempty(prefix)), recursive=True)


def storage_options(settings: Settings) -> dict[str, Any]:
    """fsspec options for the settings' artifact URL: S3 endpoint, region and keys."""
    if not settings.artifacts.startswith(("s3://", "s3a://")):
        return {}
    # Another process may write any time: never answer from a stale listing.
    options: dict[str, Any] = {"use_listings_cache": False}
    if settings.s3_endpoint_url:
        options["endpoint_url"] = settings.s3_endpoint_url
    if settings.s3_region:
        options["client_kwargs"] = {"region_name": settings.s3_region}
    if settings.s3_access_key_id:
        options["key"] = settings.s3_access_key_id
        options["secret"] = settings.s3_secret_access_key
    return options


def open_object_store(settings: Settings) -> ObjectStore:
    """The settings' artifact store: a URL with a scheme goes to fsspec, else a directory."""
    url = settings.artifacts
    if url.startswith("file://"):
        return LocalObjectStore(url.removeprefix("file://"))
    if "://" in url:
        return FsspecObjectStore(url, storage_options(settings), block_size=settings.s3_block_size)
    return LocalObjectStore(settings.artifacts_dir)
