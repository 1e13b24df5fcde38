"""GetJob latency with 0 and with N idle WatchJob streams open on the same API server.

Before issue 8 every open watch held one of the API server's 64 pool threads (a blocking
XREAD), so a few hundred idle watches starved every unary call. Watches now run on
redis.asyncio: an idle watch costs a Redis connection and a coroutine, no thread.

    python bench/bench_watch.py                # 200 idle watches, 300 GetJob calls each
    python bench/bench_watch.py --watches 500
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc

from lmforge.v1 import training_pb2, training_pb2_grpc
from lmforge_server.settings import Settings
from lmforge_server.stack import Stack

TARGET_P50_MS = 50.0


def _latencies(stub, job_id: str, n: int, timeout: float) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        try:
            stub.GetJob(training_pb2.GetJobRequest(id=job_id), timeout=timeout)
            out.append((time.perf_counter() - t) * 1000)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            out.append(timeout * 1000)  # starved: counted at the deadline
    return out


def _summary(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"p50 {statistics.median(ms):8.2f} ms   p99 {q[98]:8.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watches", type=int, default=200)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=5.0, help="deadline of each GetJob")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        fields = {f.name for f in dataclasses.fields(Settings)}
        extra = (
            {"max_watches_per_owner": args.watches + 10}
            if "max_watches_per_owner" in fields
            else {}
        )
        settings = Settings(
            data_dir=Path(tmp), api_addr="127.0.0.1:0", inference_addr="127.0.0.1:0", **extra
        )
        with Stack(settings, inference=False, worker=False) as stack:
            channel = grpc.insecure_channel(stack.api_addr)
            datasets = training_pb2_grpc.DatasetServiceStub(channel)
            jobs = training_pb2_grpc.JobServiceStub(channel)
            data = b"some words for a dataset\n" * 200
            header = training_pb2.UploadDatasetHeader(
                name="bench", sha256=hashlib.sha256(data).hexdigest()
            )
            ds = datasets.UploadDataset(
                iter(
                    [
                        training_pb2.UploadDatasetRequest(header=header),
                        training_pb2.UploadDatasetRequest(chunk=data),
                    ]
                )
            )
            spec = training_pb2.JobSpec(preset="tiny")
            job = jobs.CreateJob(training_pb2.CreateJobRequest(dataset_id=ds.id, spec=spec))
            _latencies(jobs, job.id, 30, args.timeout)  # warm up
            idle = _latencies(jobs, job.id, args.calls, args.timeout)

            # Idle watches on channels of their own (the job stays QUEUED: no worker).
            # A connection carries at most 100 concurrent streams (the server's HTTP/2
            # limit): one connection per 50 watches, not shared between channels.
            n_channels = max(1, -(-args.watches // 50))
            watch_channels = [
                grpc.insecure_channel(
                    stack.api_addr,
                    options=[("grpc.use_local_subchannel_pool", 1), ("bench.channel", i)],
                )
                for i in range(n_channels)
            ]
            streams, opened = [], threading.Semaphore(0)

            def drain(stream) -> None:
                try:
                    for _ in stream:
                        opened.release()
                except grpc.RpcError:
                    pass

            for i in range(args.watches):
                stub = training_pb2_grpc.JobServiceStub(watch_channels[i % n_channels])
                stream = stub.WatchJob(training_pb2.WatchJobRequest(id=job.id), timeout=600)
                streams.append(stream)
                threading.Thread(target=drain, args=(stream,), daemon=True).start()
            deadline = time.monotonic() + 60
            got = sum(
                opened.acquire(timeout=max(0.0, deadline - time.monotonic()))
                for _ in range(args.watches)
            )
            time.sleep(1.0)
            busy = _latencies(jobs, job.id, args.calls, args.timeout)
            for stream in streams:
                stream.cancel()
            for ch in watch_channels:
                ch.close()
            channel.close()

    print(f"GetJob, {args.calls} sequential calls, target p50 < {TARGET_P50_MS:.0f} ms")
    print(f"  0 idle watches     {_summary(idle)}")
    print(
        f"  {args.watches} idle watches   {_summary(busy)}   ({got} of them delivered their first event)"
    )


if __name__ == "__main__":
    main()
