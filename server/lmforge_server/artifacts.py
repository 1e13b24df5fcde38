"""Datasets, checkpoints and models in the artifact store (a directory or an fsspec URL).

Each artifact is published under its own key, all at once (its files, then a manifest:
lmforge_server.objectstore), and records in Redis hold that key:

    datasets/<owner>/<sha256>                            data.txt
    jobs/<job-id>/checkpoints/attempt-<n>/step-<step>    checkpoint.pt, data/tokenizer.json,
                                                         data/meta.json
    models/<model-id>/attempt-<n>                        model.onnx, variants, safetensors,
                                                         config, tokenizer, metadata, ...

Every attempt publishes its export under a key of its own, so a zombie attempt that lost
its lease never replaces the files of the attempt that registered them.

A process reads an artifact through `local_dir`: a directory store is read in place; any
other store goes through this process's size-bounded local cache, verified against the
manifest's sha256s, so a replica downloads a model once and a resumed job its checkpoint
once. Records written before the store existed hold absolute local paths; those are read
as they are.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge_server import metrics
from lmforge_server.objectstore import (
    TMP_PREFIX,
    LocalObjectStore,
    ObjectStore,
    open_object_store,
    write_file_atomic,
)

if TYPE_CHECKING:
    from lmforge_server.artifact_cache import ArtifactCache
    from lmforge_server.settings import Settings

__all__ = ["TMP_PREFIX", "ArtifactStore", "write_file_atomic"]

DATASET_FILE = "data.txt"
CHECKPOINT_FILE = "checkpoint.pt"
# What starting a model from a checkpoint needs of its attempt's data directory.
CHECKPOINT_DATA_FILES = ("tokenizer.json", "meta.json")
_ATTEMPT_RE = re.compile(r"^attempt-\d+$")


def _is_local_path(ref: str) -> bool:
    return os.path.isabs(ref)


class ArtifactStore:
    """The service's artifacts in one object store, read through one local cache."""

    def __init__(
        self,
        objects: ObjectStore,
        cache_dir: Path | str,
        cache_max_bytes: int,
        scratch_dir: Path | str,
    ):
        self.objects = objects
        self._cache_dir, self._cache_max_bytes = Path(cache_dir), cache_max_bytes
        self._cache: ArtifactCache | None = None
        # Local work space (uploads being received): never read by another process.
        self.scratch_dir = Path(scratch_dir)
        # key -> local directory already fetched and verified by this process.
        self._fetched: dict[str, Path] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        return cls(
            open_object_store(settings),
            settings.artifact_cache_dir,
            settings.artifact_cache_max_bytes,
            settings.data_dir / "scratch",
        )

    @property
    def cache(self) -> ArtifactCache:
        """This process's cache of a remote store (created on first use)."""
        with self._lock:
            if self._cache is None:
                from lmforge_server.artifact_cache import ArtifactCache

                self._cache = ArtifactCache(self.objects, self._cache_dir, self._cache_max_bytes)
            return self._cache

    # -- keys

    @staticmethod
    def dataset_key(owner: str, sha256: str) -> str:
        return f"datasets/{owner}/{sha256}"

    @staticmethod
    def checkpoint_key(job_id: str, attempt: int, step: int) -> str:
        return f"jobs/{job_id}/checkpoints/attempt-{attempt}/step-{step:08d}"

    @staticmethod
    def model_key(model_id: str, attempt: int) -> str:
        return f"models/{model_id}/attempt-{attempt}"

    # -- writes (each streams its files; nothing is loaded whole)

    def put_dataset(self, owner: str, sha256: str, path: Path) -> str:
        """Publishes an uploaded corpus (content-addressed: once per owner and sha256)."""
        key = self.dataset_key(owner, sha256)
        manifest = self.objects.open_manifest(key)
        if manifest is None or [(f.name, f.sha256) for f in manifest.files] != [
            (DATASET_FILE, sha256)
        ]:
            self.objects.publish(key, {DATASET_FILE: path})
        return key

    def put_checkpoint(
        self, job_id: str, attempt: int, step: int, path: Path, data_dir: Path | None = None
    ) -> str:
        """Publishes a checkpoint with its attempt's tokenizer (`data/`), so that another
        machine can resume it or start a model from it."""
        files: dict[str, Path] = {CHECKPOINT_FILE: path}
        for name in CHECKPOINT_DATA_FILES:
            if data_dir is not None and (data_dir / name).is_file():
                files[f"data/{name}"] = data_dir / name
        key = self.checkpoint_key(job_id, attempt, step)
        self.objects.publish(key, files)
        return key

    def put_model(self, model_id: str, attempt: int, directory: Path) -> str:
        """Publishes every file under `directory` (an attempt's export) as the attempt's model."""
        files = {
            p.relative_to(directory).as_posix(): p
            for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
        key = self.model_key(model_id, attempt)
        self.objects.publish(key, files)
        return key

    # -- reads

    def local_dir(self, ref: str) -> Path:
        """A local directory holding the published files of `ref` (a key, or a legacy
        absolute path, returned as is). FileNotFoundError when nothing is published there;
        ArtifactCorrupt (an IOError) when the store's objects differ from the manifest."""
        if _is_local_path(ref):
            return Path(ref)
        with self._lock:
            known = self._fetched.get(ref)
        if known is not None and known.is_dir():
            return known
        manifest = self.objects.open_manifest(ref)
        if manifest is None:
            raise FileNotFoundError(f"no artifact is published at {ref!r}")
        if isinstance(self.objects, LocalObjectStore):
            path = self.objects.root / manifest.prefix / manifest.version
        else:
            before = self.cache.stats.downloads
            path = self.cache.fetch_manifest(manifest)
            downloaded = self.cache.stats.downloads - before
            if downloaded:
                metrics.ARTIFACT_DOWNLOADS.labels(ref.split("/", 1)[0]).inc(downloaded)
        with self._lock:
            self._fetched[ref] = path
        return path

    def dataset_file(self, ref: str) -> Path:
        """The corpus file of a dataset record's `path`."""
        return Path(ref) if _is_local_path(ref) else self.local_dir(ref) / DATASET_FILE

    def checkpoint_file(self, ref: str) -> Path:
        """The checkpoint file of a job record's `checkpoint`."""
        return Path(ref) if _is_local_path(ref) else self.local_dir(ref) / CHECKPOINT_FILE

    # -- removal

    def remove(self, ref: str) -> None:
        """Removes an artifact (its manifest first, so no reader trusts a part of it)."""
        if _is_local_path(ref):
            path = Path(ref)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            return
        self.objects.delete_prefix(f"{ref}/manifest.json")
        self.objects.delete_prefix(ref)
        with self._lock:
            self._fetched.pop(ref, None)

    def remove_dataset(self, ref: str) -> None:
        self.remove(str(Path(ref).parent) if _is_local_path(ref) else ref)

    def remove_checkpoints_before(self, ref: str, keep: set[str] = frozenset()) -> None:
        """Removes the checkpoints of `ref`'s attempt older than `ref` (a checkpoint key),
        except those in `keep`."""
        if _is_local_path(ref):
            path = Path(ref)
            for old in path.parent.glob("step-*.pt"):
                if old.name < path.name and str(old) not in keep:
                    old.unlink(missing_ok=True)
            return
        attempt_prefix, _, name = ref.rpartition("/")
        older = {
            parts[0]
            for obj in self.objects.list(attempt_prefix)
            if (parts := obj.key[len(attempt_prefix) + 1 :].split("/"))[0] < name
            and parts[0].startswith("step-")
        }
        for step in sorted(older):
            if f"{attempt_prefix}/{step}" not in keep:
                self.remove(f"{attempt_prefix}/{step}")

    def remove_other_exports(self, model_id: str, keep: str) -> None:
        """Removes exports of the model other than `keep` (the registered one): files of
        attempts that exported and then died or lost their lease."""
        base = f"models/{model_id}"
        attempts = {obj.key[len(base) + 1 :].split("/")[0] for obj in self.objects.list(base)}
        for attempt in sorted(a for a in attempts if _ATTEMPT_RE.match(a)):
            if f"{base}/{attempt}" != keep:
                self.remove(f"{base}/{attempt}")
