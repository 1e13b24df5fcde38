"""Loading a model-sized artifact from an object store (not a CI test).

An artifact of 43 MB of random bytes (the size of a `baby` model's model.onnx) is
published once to a local directory store and once to S3 (moto's server in a process of
its own, on loopback), then loaded by an inference replica's path:
  (a) today's path: read the file in place from the local artifacts directory (no copy,
      no sha256; it comes from the page cache, so this is a floor, not a load),
  (b) cold load through the artifact cache from the local directory store (the baseline
      the other rows are divided by),
  (c) cold load through the artifact cache from S3 (download, sha256 verified),
  (d) warm load: the artifact is already cached; every file is verified again.
Each is the median of --repeats runs, each cold run with an empty cache.

    python bench/bench_objectstore.py [--mb 43] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3

from lmforge_server.artifact_cache import ArtifactCache
from lmforge_server.objectstore import CHUNK, LocalObjectStore, ObjectStore, open_object_store
from lmforge_server.settings import Settings

BUCKET = "lmforge-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)
    boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    ).create_bucket(Bucket=BUCKET)
    return proc, url


def read_direct(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass
    return time.perf_counter() - start


def cold_and_warm(store: ObjectStore, root: Path, repeats: int) -> tuple[float, float]:
    colds, warms = [], []
    for i in range(repeats):
        cache = ArtifactCache(store, root / f"cache-{i}", max_bytes=1 << 40)
        start = time.perf_counter()
        cache.fetch("models/bench")
        colds.append(time.perf_counter() - start)
        start = time.perf_counter()
        cache.fetch("models/bench")
        warms.append(time.perf_counter() - start)
        assert (cache.stats.downloads, cache.stats.hits) == (1, 1)
    return statistics.median(colds), statistics.median(warms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=43.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = int(args.mb * 1e6)

    moto, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            model = root / "model.onnx"
            with open(model, "wb") as f:
                for at in range(0, size, CHUNK):
                    f.write(os.urandom(min(CHUNK, size - at)))

            local = LocalObjectStore(root / "store")
            s3 = open_object_store(
                Settings(
                    data_dir=root / "data",
                    artifacts=f"s3://{BUCKET}/artifacts",
                    s3_endpoint_url=endpoint,
                    s3_region="us-east-1",
                    s3_access_key_id="bench",
                    s3_secret_access_key="bench",
                )
            )
            publish = {}
            for name, store in (("s3", s3), ("local", local)):
                start = time.perf_counter()
                manifest = store.publish("models/bench", {"model.onnx": model})
                publish[name] = time.perf_counter() - start
            published = root / "store" / manifest.key("model.onnx")  # the local one

            direct = statistics.median(read_direct(published) for _ in range(args.repeats))
            local_cold, local_warm = cold_and_warm(local, root / "local", args.repeats)
            s3_cold, s3_warm = cold_and_warm(s3, root / "s3", args.repeats)
    finally:
        moto.kill()
        moto.wait()

    mb = size / 1e6
    print(f"artifact: {mb:.1f} MB, median of {args.repeats}; moto S3 on loopback")
    print(f"{'load':<46}{'seconds':>9}{'MB/s':>9}{'vs (b)':>8}")
    rows = [
        ("(a) read in place, page cache (no copy/sha)", direct),
        ("(b) cold, cache <- local directory (baseline)", local_cold),
        ("(c) cold, cache <- S3", s3_cold),
        ("(d) warm, cached (S3 entry, sha256 verified)", s3_warm),
        ("    warm, cached (local entry, sha256 verified)", local_warm),
    ]
    for label, seconds in rows:
        print(f"{label:<46}{seconds:>9.3f}{mb / seconds:>9.0f}{seconds / local_cold:>7.1f}x")
    for name, seconds in publish.items():
        print(f"publish to {name:<35}{seconds:>9.3f}{mb / seconds:>9.0f}")


if __name__ == "__main__":
    main()
