"""The fleet on one machine (not a CI test): two figures, each beside its baseline.

1. Cold model load on an inference replica: a model trained once (preset --preset, a few
   steps) is served by a fresh inference server process with an empty data directory, and
   the first ModelInfo(load) call is timed: the replica resolves the model, fetches it
   (from S3: download and sha256 check into its cache; from the local directory store: in
   place) and opens its ONNX Runtime session. Baseline: the local directory store. The
   S3 endpoint is moto's server in a process of its own, on loopback. Median of --repeats
   fresh replicas per store.
2. Tiny jobs per minute with 1 worker (baseline) and with 2 workers: --jobs jobs of
   --steps steps submitted at once, timed from the first submission to the last success.
   On a 2-core machine two workers share the same two cores, so expect no gain.

    python bench/bench_fleet.py [--preset tiny] [--repeats 3] [--jobs 6] [--steps 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_objectstore import BUCKET, start_moto  # noqa: E402

import lmforge  # noqa: E402
from lmforge_server.redis_server import free_port  # noqa: E402
from lmforge_server.settings import Settings  # noqa: E402
from lmforge_server.stack import BUNDLED_CORPUS, Child, Stack, wait_serving  # noqa: E402

CORPUS = BUNDLED_CORPUS.read_text()[:100_000].encode()


def _addr() -> str:
    return f"127.0.0.1:{free_port('127.0.0.1')}"


def settings_for(root: Path, store: dict, **extra) -> Settings:
    return Settings(
        data_dir=root,
        api_addr=_addr(),
        inference_addr=_addr(),
        api_metrics_addr=_addr(),
        inference_metrics_addr=_addr(),
        worker_metrics_addr=_addr(),
        device="cpu",
        inference_device="cpu",
        torch_threads=1,
        **store,
        **extra,
    )


def cold_loads(root: Path, store: dict, preset: str, repeats: int) -> list[float]:
    """Trains one model on a stack using `store`, then times fresh replicas loading it."""
    with Stack(settings_for(root / "stack", store), inference=False) as stack:
        with lmforge.Client(api_addr=stack.api_addr) as client:
            ds = client.datasets.upload(CORPUS, name="bench")
            training = {"max_steps": 5, "warmup_steps": 0, "eval_batches": 2}
            job = client.jobs.create(dataset=ds, preset=preset, training=training)
            done = client.jobs.wait(job.id, timeout=900)
            assert done.state == "SUCCEEDED", done.error
        seconds = []
        for i in range(repeats):
            replica = dataclasses.replace(
                stack.settings,
                data_dir=root / f"replica-{i}",
                inference_addr=_addr(),
                inference_metrics_addr=_addr(),
            )
            child = Child("inference", replica, root / "logs" / f"replica-{i}").start()
            try:
                wait_serving(replica.inference_addr, child=child)
                with lmforge.Client(inference_addr=replica.inference_addr) as client:
                    start = time.perf_counter()
                    client.models.info(done.model_id)
                    seconds.append(time.perf_counter() - start)
            finally:
                child.stop()
        return seconds


def jobs_per_minute(root: Path, workers: int, jobs: int, steps: int) -> float:
    with Stack(settings_for(root, {}), inference=False) as stack:
        extra = [
            Child("worker", dataclasses.replace(stack.settings, worker_metrics_addr=_addr()),
                  root / "logs" / f"worker-{i}").start()
            for i in range(workers - 1)
        ]  # fmt: skip
        stack.children.extend(extra)
        with lmforge.Client(api_addr=stack.api_addr) as client:
            ds = client.datasets.upload(CORPUS, name="bench")
            start = time.perf_counter()
            ids = [
                client.jobs.create(dataset=ds, preset="tiny", training={"max_steps": steps}).id
                for _ in range(jobs)
            ]
            for job_id in ids:
                done = client.jobs.wait(job_id, timeout=1800)
                assert done.state == "SUCCEEDED", done.error
            return jobs / ((time.perf_counter() - start) / 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-jobs", action="store_true")
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")

    moto, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            s3 = dict(
                artifacts=f"s3://{BUCKET}/fleet",
                s3_endpoint_url=endpoint,
                s3_region="us-east-1",
                s3_access_key_id="bench",
                s3_secret_access_key="bench",
            )
            # The local store is one directory every process on this host reads.
            store_dir = {"artifacts": str(root / "local" / "store")}
            local = cold_loads(root / "local", store_dir, args.preset, args.repeats)
            remote = cold_loads(root / "s3", s3, args.preset, args.repeats)
            base = statistics.median(local)
            print(f"cold model load on a fresh inference replica ({args.preset}), "
                  f"median of {args.repeats}")  # fmt: skip
            print(f"  {'local directory store (baseline)':<36}{base:8.3f} s")
            print(f"  {'S3 (moto on loopback)':<36}{statistics.median(remote):8.3f} s"
                  f"  {statistics.median(remote) / base:5.2f}x")  # fmt: skip
            print(f"  runs: local {[round(s, 3) for s in local]}, "
                  f"s3 {[round(s, 3) for s in remote]}")  # fmt: skip
            if not args.skip_jobs:
                one = jobs_per_minute(root / "w1", 1, args.jobs, args.steps)
                two = jobs_per_minute(root / "w2", 2, args.jobs, args.steps)
                print(f"tiny jobs ({args.steps} steps) per minute, {args.jobs} jobs")
                print(f"  {'1 worker (baseline)':<36}{one:8.2f}")
                print(f"  {'2 workers':<36}{two:8.2f}  {two / one:5.2f}x")
    finally:
        moto.kill()
        moto.wait()
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")
    subprocess.run(["uptime"], check=False)


if __name__ == "__main__":
    main()
