"""The artifact store: a directory with atomic writes.

Layout: datasets/<owner>/<sha256>/data.txt, jobs/<job-id>/..., models/<model-id>/...
Writes go to a temporary name beside the target and are renamed into place, so a reader
never sees half a file; a crash leaves only a temporary, which the next writer removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


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


class ArtifactStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        """The local path of an artifact (it may not exist)."""
        return self.root.joinpath(*parts)

    def dataset_dir(self, owner: str, sha256: str) -> Path:
        return self.path("datasets", owner, sha256)

    def job_dir(self, job_id: str) -> Path:
        return self.path("jobs", job_id)

    def model_dir(self, model_id: str) -> Path:
        return self.path("models", model_id)

    @contextlib.contextmanager
    def atomic_dir(self, target: Path) -> Iterator[Path]:
        """Yield a temporary directory that is renamed to `target` only on success.

        Temporaries that an earlier, killed writer of the same target left behind are
        removed first (one writer per target at a time: the job's lease holder).
        """
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f"{TMP_PREFIX}*-{target.name}"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{target.name}")
        tmp.mkdir()
        try:
            yield tmp
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def staging_dir(self, target: Path, attempt: int) -> Iterator[Path]:
        """A directory beside `target` for one attempt's export; removed on exit unless
        `publish` moved it into place."""
        target.parent.mkdir(parents=True, exist_ok=True)
        # Staging left by earlier attempts that were killed mid-export.
        for stale in target.parent.glob(f"{TMP_PREFIX}a*-*-{target.name}"):
            earlier = stale.name[len(TMP_PREFIX) + 1 :].split("-", 1)[0]
            if earlier.isdigit() and int(earlier) < attempt:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = target.with_name(f"{TMP_PREFIX}a{attempt}-{uuid.uuid4().hex}-{target.name}")
        tmp.mkdir()
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def attempt_dir(target: Path, attempt: int) -> Path:
        return target.with_name(f"{target.name}.attempt-{attempt}")

    def publish(self, staged: Path, target: Path, attempt: int) -> Path:
        """Moves a staged export to `target`, or to the attempt's own directory beside it
        when `target` already holds files. Never replaces a directory with files in it, so
        a zombie attempt cannot overwrite the files of the attempt that registered them."""
        for candidate in (target, self.attempt_dir(target, attempt)):
            try:
                os.rename(staged, candidate)  # fails on a non-empty directory
                return candidate
            except OSError:
                continue
        raise FileExistsError(f"{target} and its attempt-{attempt} directory are taken")

    def remove_other_exports(self, target: Path, keep: Path) -> None:
        """Removes exports of `target`'s model other than `keep` (the registered one):
        files of attempts that exported and then died or lost their lease."""
        for path in [target, *target.parent.glob(f"{target.name}.attempt-*")]:
            if path != keep and path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def remove(self, target: Path) -> None:
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
