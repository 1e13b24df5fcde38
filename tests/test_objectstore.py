"""The object store and the artifact cache, on a local directory and on a real S3 endpoint.

The S3 endpoint is moto's standalone server on a free loopback port (the way s3fs's own
tests run); every test runs on both backends.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import BUCKET, s3_client

from lmforge_server.artifact_cache import (
    ArtifactCache,
    ArtifactCorrupt,
    ArtifactNotFound,
    file_sha256,
    open_artifact_cache,
)
from lmforge_server.objectstore import (
    MANIFEST_NAME,
    FsspecObjectStore,
    LocalObjectStore,
    open_object_store,
)
from lmforge_server.settings import Settings

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def settings(request, tmp_path) -> Settings:
    """Settings whose artifact store is a fresh directory, or a fresh prefix in the bucket."""
    base = dict(
        data_dir=tmp_path / "data",
        artifact_cache=str(tmp_path / "cache"),
        s3_block_size=5 * MiB,
    )
    if request.param == "local":
        return Settings(artifacts=str(tmp_path / "store"), **base)
    return Settings(
        artifacts=f"s3://{BUCKET}/{uuid.uuid4().hex}",
        s3_endpoint_url=request.getfixturevalue("s3_endpoint"),
        s3_region="us-east-1",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        **base,
    )


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def child_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings.to_env()}


def test_published_artifact_round_trips_with_sha256s(settings, tmp_path):
    store = open_object_store(settings)
    contents = {"model.onnx": os.urandom(3000), "tokenizer/vocab.json": b'{"a": 1}'}
    src = {name: write(tmp_path / "src" / name, data) for name, data in contents.items()}

    assert store.open_manifest("models/m1") is None
    published = store.publish("models/m1", src)

    manifest = store.open_manifest("models/m1")
    assert manifest == published
    assert {(f.name, f.size, f.sha256) for f in manifest.files} == {
        (name, len(data), sha256(data)) for name, data in contents.items()
    }
    local = open_artifact_cache(store, settings).fetch("models/m1")
    for name, data in contents.items():
        assert (local / name).read_bytes() == data
    assert {o.key for o in store.list("models/m1")} == {
        f"models/m1/{MANIFEST_NAME}",
        *(manifest.key(name) for name in contents),
    }

    # Publishing again replaces the manifest; the old version stays until swept.
    republished = store.publish("models/m1", {"model.onnx": write(tmp_path / "v2", b"v2")})
    assert store.open_manifest("models/m1") == republished != published
    assert store.read_bytes(published.key("model.onnx")) == contents["model.onnx"]
    assert store.sweep(older_than_s=0) == [f"models/m1/{published.version}"]
    assert store.read_bytes(published.key("model.onnx")) is None
    assert store.read_bytes(republished.key("model.onnx")) == b"v2"

    store.delete_prefix("models/m1")
    assert store.open_manifest("models/m1") is None
    assert store.list("models") == []


KILLED_WRITER = """
import sys
from lmforge_server.objectstore import open_object_store
from lmforge_server.settings import Settings
store = open_object_store(Settings.from_env())
# a.bin uploads; b.bin is a FIFO nobody writes to, so the writer blocks before its manifest.
store.publish("models/crashed", {"a.bin": sys.argv[1], "b.bin": sys.argv[2]})
"""


def test_killed_writer_leaves_nothing_readable_and_is_swept(settings, tmp_path):
    store = open_object_store(settings)
    store.publish("models/kept", {"a.bin": write(tmp_path / "kept", b"kept")})
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(write(tmp_path / "a", b"a" * 1000)), str(fifo)],
        env=child_env(settings),
    )
    try:
        deadline = time.monotonic() + 30
        # Until a.bin is whole (a local put is a temporary file first, then a rename).
        while not any(o.key.endswith("/a.bin") for o in store.list("models/crashed")):
            assert writer.poll() is None, "the writer ended before it was killed"
            assert time.monotonic() < deadline, "the writer uploaded nothing"
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()

    left = store.list("models/crashed")
    assert [o.key.rsplit("/", 1)[-1] for o in left] == ["a.bin"]
    assert store.open_manifest("models/crashed") is None
    with pytest.raises(ArtifactNotFound):
        open_artifact_cache(store, settings).fetch("models/crashed")

    assert store.sweep(older_than_s=3600) == []  # too young: it may be a writer still working
    assert [o.key for o in store.list("models/crashed")] == [o.key for o in left]
    (swept,) = store.sweep(older_than_s=0)
    assert swept.startswith("models/crashed/v-")
    assert store.list("models/crashed") == []
    kept = store.open_manifest("models/kept")
    assert store.read_bytes(kept.key("a.bin")) == b"kept"


def test_temporary_of_a_killed_manifest_write_is_swept(settings, tmp_path):
    store = open_object_store(settings)
    store.publish("models/m", {"a": write(tmp_path / "a", b"a")})
    # What a local writer killed between writing and renaming its manifest leaves.
    store.put(f"models/m/.tmp-{MANIFEST_NAME}.x1", write(tmp_path / "t", b"{"))
    # Not a manifest this store wrote: a sweep leaves what lies around it alone.
    store.put(MANIFEST_NAME, write(tmp_path / "foreign", b"not json"))
    store.put(f"foreign/{MANIFEST_NAME}", write(tmp_path / "foreign", b"not json"))
    store.put("foreign/v-20200101T000000Z-0123456789ab/x", write(tmp_path / "x", b"x"))
    assert store.sweep(older_than_s=3600) == []
    assert store.sweep(older_than_s=0) == [f"models/m/.tmp-{MANIFEST_NAME}.x1"]
    manifest = store.open_manifest("models/m")
    assert {o.key for o in store.list("models/m")} == {
        f"models/m/{MANIFEST_NAME}",
        manifest.key("a"),
    }


def test_corrupted_cached_file_is_fetched_again(settings, tmp_path):
    store = open_object_store(settings)
    data = os.urandom(5000)
    store.publish(
        "models/m", {"model.onnx": write(tmp_path / "m", data), "b": write(tmp_path / "b", b"b")}
    )
    cache = open_artifact_cache(store, settings)
    local = cache.fetch("models/m")
    assert cache.stats.downloads == 2

    cache.fetch("models/m")
    assert (cache.stats.downloads, cache.stats.hits) == (2, 1)

    flipped = bytearray(data)
    flipped[100] ^= 1  # same size: only the sha256 tells
    (local / "model.onnx").write_bytes(bytes(flipped))
    assert cache.fetch("models/m") == local
    assert cache.stats.downloads == 3  # that one file, not the other
    assert (local / "model.onnx").read_bytes() == data


def test_object_that_differs_from_its_manifest_is_refused(settings, tmp_path):
    store = open_object_store(settings)
    manifest = store.publish("models/m", {"model.onnx": write(tmp_path / "m", b"good" * 100)})
    store.put(manifest.key("model.onnx"), write(tmp_path / "bad", b"evil" * 100))
    cache = open_artifact_cache(store, settings)
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        cache.fetch("models/m")
    entries = list((settings.artifact_cache_dir / "entries").iterdir())
    assert [list(e.iterdir()) for e in entries] == [[]]  # nothing a later fetch would trust


def test_least_recently_used_artifact_is_evicted_at_the_size_bound(settings, tmp_path):
    store = open_object_store(settings)
    for name in "abc":
        store.publish(f"models/{name}", {"w": write(tmp_path / name, name.encode() * 100)})
    cache = ArtifactCache(store, settings.artifact_cache_dir, max_bytes=250)
    a = cache.fetch("models/a")
    b = cache.fetch("models/b")
    cache.fetch("models/a")  # a is now more recently used than b
    c = cache.fetch("models/c")

    assert cache.stats.evictions == 1
    assert a.exists() and c.exists() and not b.exists()
    assert (a / "w").read_bytes() == b"a" * 100
    downloads = cache.stats.downloads
    cache.fetch("models/b")  # back in; a is now the least recently used
    assert cache.stats.downloads == downloads + 1
    assert not a.exists() and b.exists() and c.exists()


BIG_TRANSFER = """
import json, sys, tracemalloc
from lmforge_server.artifact_cache import ArtifactCache
from lmforge_server.objectstore import open_object_store
from lmforge_server.settings import Settings
store = open_object_store(Settings.from_env())
store.list("")  # create the filesystem before measuring
tracemalloc.start()
manifest = store.publish("models/big", {"model.onnx": sys.argv[1]})
local = ArtifactCache(store, sys.argv[2], max_bytes=1 << 40).fetch("models/big")
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1], "sha256": manifest.files[0].sha256,
                  "key": manifest.key("model.onnx"), "path": str(local / "model.onnx")}))
"""


def test_large_file_round_trips_without_loading_into_memory(settings, tmp_path):
    # Over four 5 MiB blocks: a multipart upload on S3. s3fs and botocore hold up to about
    # three copies of a block at once (measured: 16.8 MiB for 16 MiB and 48 MiB files alike).
    size = 24 * MiB
    big = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(big, "wb") as f:
        for _ in range(size // MiB):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            f.write(chunk)

    # In a process of its own: in this one, moto's server holds the objects in memory.
    run = subprocess.run(
        [sys.executable, "-c", BIG_TRANSFER, str(big), str(tmp_path / "cache2")],
        env=child_env(settings),
        capture_output=True,
        check=True,
    )
    result = json.loads(run.stdout)
    assert result["sha256"] == digest.hexdigest()
    assert file_sha256(Path(result["path"])) == digest.hexdigest()
    peak = result["peak"]
    bound = 4 * settings.s3_block_size
    assert peak < bound < size, f"peak {peak / MiB:.1f} MiB for a {size / MiB:.0f} MiB file"
    if settings.artifacts.startswith("s3://"):
        key = f"{settings.artifacts.removeprefix(f's3://{BUCKET}/')}/{result['key']}"
        etag = s3_client(settings.s3_endpoint_url).head_object(Bucket=BUCKET, Key=key)["ETag"]
        assert etag.strip('"').endswith("-5")  # five parts: a multipart upload


CACHED_READER = """
import json
import logging
from lmforge_server.artifact_cache import open_artifact_cache
from lmforge_server.objectstore import open_object_store
from lmforge_server.settings import Settings
settings = Settings.from_env()
cache = open_artifact_cache(open_object_store(settings), settings)
path = cache.fetch("models/shared")
print(json.dumps({"downloads": cache.stats.downloads, "data": (path / "w").read_text()}))
"""


def test_processes_on_one_host_download_an_artifact_once(settings, tmp_path):
    store = open_object_store(settings)
    store.publish("models/shared", {"w": write(tmp_path / "w", b"x" * 100_000)})
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", CACHED_READER], env=child_env(settings), stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    results = [json.loads(r.communicate(timeout=60)[0]) for r in readers]
    assert [r["data"] == "x" * 100_000 for r in results] == [True, True]
    # One of them downloaded; the other waited on the entry's lock, then found it cached.
    assert sorted(r["downloads"] for r in results) == [0, 1]


def test_forked_child_creates_its_own_filesystem(settings, tmp_path):
    store = open_object_store(settings)
    store.publish("models/m", {"w": write(tmp_path / "w", b"parent")})
    assert store.open_manifest("models/m") is not None
    parent_fs = store.fs if isinstance(store, FsspecObjectStore) else None

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        try:
            os.close(read_end)
            cache = ArtifactCache(store, tmp_path / "child-cache", max_bytes=1 << 30)
            report = {"data": (cache.fetch("models/m") / "w").read_text()}
            if parent_fs is not None:
                report["own_fs"] = store.fs is not parent_fs
            os.write(write_end, json.dumps(report).encode())
        except BaseException as e:
            os.write(write_end, json.dumps({"error": repr(e)}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    ready = []
    try:
        ready, _, _ = select.select([read_end], [], [], 30)
        assert ready, "the forked child hung"
        report = json.loads(os.read(read_end, 65536))
    finally:
        os.close(read_end)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert report.get("data") == "parent", report
    if parent_fs is not None:
        assert report["own_fs"] is True
        assert store.fs is parent_fs  # the parent keeps its own


class FailingSource:
    """A stream that breaks after `limit` bytes, like a source disk or socket failing."""

    def __init__(self, limit: int):
        self.limit, self.sent = limit, 0

    def read(self, n: int = -1) -> bytes:
        if self.sent >= self.limit:
            raise OSError("source failed")
        self.sent += MiB
        return b"z" * MiB


def test_failed_upload_leaves_no_object(settings):
    store = open_object_store(settings)
    with pytest.raises(OSError, match="source failed"):
        store.put("models/m/partial.bin", FailingSource(6 * MiB))  # one part already sent on S3
    assert store.list("models") == []
    if settings.artifacts.startswith("s3://"):
        uploads = s3_client(settings.s3_endpoint_url).list_multipart_uploads(Bucket=BUCKET)
        assert not [u for u in uploads.get("Uploads", []) if "partial.bin" in u["Key"]]


@pytest.mark.parametrize(
    "prefix",
    ["", "/", "../x", "a/../b", "a/.tmp-x", "m/manifest.json", "m/v-20260101T000000Z-0123456789ab"],
)
def test_prefix_that_could_reach_store_internals_is_refused(tmp_path, prefix):
    store = open_object_store(Settings(data_dir=tmp_path))
    with pytest.raises(ValueError, match="prefix"):
        store.publish(prefix, {})
    with pytest.raises(ValueError, match="file name"):
        store.publish("models/m", {"../escape": tmp_path})


def test_store_and_cache_come_from_settings(tmp_path):
    env = {
        "LMFORGE_DATA_DIR": str(tmp_path),
        "LMFORGE_ARTIFACTS": "s3://bucket/prefix",
        "LMFORGE_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "LMFORGE_S3_REGION": "eu-west-1",
        "LMFORGE_S3_ACCESS_KEY_ID": "id",
        "LMFORGE_S3_SECRET_ACCESS_KEY": "secret",
        "LMFORGE_ARTIFACT_CACHE_MAX_BYTES": "1000",
    }
    settings = Settings.from_env(env)
    assert "secret" not in repr(settings)
    with pytest.raises(ValueError, match="is a URL"):
        settings.artifacts_dir  # noqa: B018  # old callers must not get a directory "s3:/…"
    store = open_object_store(settings)
    assert isinstance(store, FsspecObjectStore) and store._fs is None  # created on first use
    assert store.storage_options == {
        "use_listings_cache": False,
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
        "key": "id",
        "secret": "secret",
    }
    cache = open_artifact_cache(store, settings)
    assert (cache.dir, cache.max_bytes) == (tmp_path / "cache", 1000)
    local = open_object_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalObjectStore) and local.root == tmp_path / "artifacts"
    assert open_object_store(Settings(artifacts=f"file://{tmp_path}/a")).root == tmp_path / "a"
