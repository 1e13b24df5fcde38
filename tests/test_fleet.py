"""A fleet on one machine: processes that share nothing but Redis and an S3 endpoint.

Two API servers, two workers and two inference servers, each with its own empty data
directory, so every artifact one of them reads comes from the store (moto's S3 server on
loopback), never from a disk another process wrote.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import SMALL_CORPUS, Api, make_settings, store_settings

import lmforge
from lmforge.v1 import training_pb2
from lmforge_server.artifacts import CHECKPOINT_DATA_FILES
from lmforge_server.redis_server import RedisServer, free_port
from lmforge_server.stack import Child, wait_serving

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(600)]


def _addr() -> str:
    return f"127.0.0.1:{free_port('127.0.0.1')}"


class Fleet:
    def __init__(self, root: Path, redis_url: str, store: dict):
        self.root, self.redis_url, self.store = root, redis_url, store
        self.children: dict[str, Child] = {}

    def start(self, name: str, role: str) -> Child:
        """`role` in a process of its own, with its own data directory and ports."""
        settings = make_settings(
            self.root / name,
            redis_url=self.redis_url,
            api_addr=_addr(),
            inference_addr=_addr(),
            api_metrics_addr=_addr(),
            inference_metrics_addr=_addr(),
            worker_metrics_addr=_addr(),
            **self.store,
        )
        child = self.children[name] = Child(role, settings, self.root / "logs" / name).start()
        if role in ("api", "inference"):
            wait_serving(getattr(settings, f"{role}_addr"), child=child)
        return child

    def metric(self, name: str, metric: str, label: str = "") -> float:
        """The sum of `metric`'s samples (with `label` in their labels) on the child's
        Prometheus endpoint."""
        s = self.children[name].settings
        addr = getattr(s, f"{self.children[name].role}_metrics_addr")
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(metric + "{") and label in line
        )

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{c.log_tail(1500)}" for n, c in self.children.items())

    def stop(self) -> None:
        for child in self.children.values():
            child.kill()


def test_fleet_sharing_only_redis_and_s3_survives_a_killed_worker_and_api_server(request, tmp_path):
    with RedisServer(tmp_path / "redis") as redis:
        fleet = Fleet(tmp_path, redis.url, store_settings(request, "s3"))
        try:
            _run(fleet)
        except BaseException:
            print(fleet.logs())
            raise
        finally:
            fleet.stop()


def _run(fleet: Fleet) -> None:
    apis = [fleet.start(f"api{i}", "api") for i in (1, 2)]
    fleet.start("worker1", "worker")
    infs = [fleet.start(f"inference{i}", "inference") for i in (1, 2)]
    api_addrs = [c.settings.api_addr for c in apis]
    client = lmforge.Client(api_addr=api_addrs, timeout=60)

    dataset = client.datasets.upload(SMALL_CORPUS.encode(), name="fleet")
    job = client.jobs.create(
        dataset=dataset,
        preset="tiny",
        training={"max_steps": 400, "checkpoint_interval": 25, "eval_interval": 200},
        model_name="fleet",
    )
    watched: list = []
    watch_error: list[BaseException] = []

    def watch() -> None:
        try:
            watched.extend(client.jobs.watch(job.id, timeout=600))
        except BaseException as e:  # noqa: BLE001 (reported by the test thread)
            watch_error.append(e)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    # Worker 1 trains past a checkpoint (uploaded to S3), then dies without a word.
    with grpc.insecure_channel(api_addrs[0]) as channel:
        raw = Api(channel)
        _wait(lambda: max(_checkpoint_steps(raw.events_so_far(job.id, wait=0.5)), default=0) >= 25)
    fleet.children["worker1"].kill()
    # Its host is gone with it: nothing it wrote locally can be read by anyone.
    shutil.rmtree(fleet.children["worker1"].settings.data_dir)
    # Both API servers run the reaper: the job is requeued once, for one new trainer.
    fleet.start("worker2", "worker")
    _wait(lambda: client.jobs.get(job.id).attempt == 2 and client.jobs.get(job.id).progress.step)

    # The API server carrying the watch dies mid-stream; the SDK resumes on the other.
    carrying = [
        c
        for c, name in zip(apis, ("api1", "api2"), strict=True)
        if fleet.metric(name, "lmforge_grpc_open_streams", "JobService/WatchJob") >= 1
    ]
    assert len(carrying) == 1, "the watch is open on exactly one API server"
    carrying[0].kill()
    watcher.join(timeout=600)
    assert not watch_error, watch_error
    survivor = next(a for a in apis if a.alive())

    done = client.jobs.get(job.id)
    assert done.state == "SUCCEEDED", done.error
    assert done.attempt == 2
    # Resumed from its checkpoint in S3, by a worker whose own data directory was empty.
    everything = list(
        lmforge.Client(api_addr=survivor.settings.api_addr).jobs.watch(job.id, timeout=60)
    )
    states = [e.message for e in everything if e.type == "STATE"]
    assert sum("lost; requeued" in m for m in states) == 1, states
    [resumed] = [m for m in states if m.startswith("attempt 2")]
    step = int(re.search(r"resuming from jobs/[^ ]*/step-(\d+)", resumed)[1])
    assert step >= 25, resumed
    start2 = next(i for i, e in enumerate(everything) if e.message.startswith("attempt 2"))
    steps2 = [e.progress.step for e in everything[start2:] if e.type == "PROGRESS"]
    assert steps2[0] > step and steps2 == sorted(steps2)
    # Worker 2 downloaded that checkpoint's files (the state and the tokenizer) once each.
    files = 1 + len(CHECKPOINT_DATA_FILES)
    assert fleet.metric("worker2", "lmforge_artifact_downloads_total", 'kind="jobs"') == files
    # No event lost or given twice across the API server's death.
    assert [e.id for e in watched] == [e.id for e in everything]
    assert watched[-1].terminal

    # Both inference servers serve the model, each downloading it once; greedy agrees.
    model = client.models.get(done.model_id)
    texts = []
    for i, inf in enumerate(infs, start=1):
        with lmforge.Client(inference_addr=inf.settings.inference_addr) as c:
            for _ in range(2):
                out = c.generate(model.id, "ROMEO:", max_tokens=24, temperature=0.0)
                texts.append(out.text)
        downloads = fleet.metric(f"inference{i}", "lmforge_artifact_downloads_total", "models")
        assert downloads == len(model.files), (i, downloads, model.files)
    assert len(set(texts)) == 1 and texts[0], texts


def _checkpoint_steps(events) -> list[int]:
    return [
        int(e.message.rsplit(" ", 1)[-1])
        for e in events
        if e.type == training_pb2.JOB_EVENT_TYPE_CHECKPOINT
    ]


def _wait(predicate, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (lmforge.errors.LmforgeError, grpc.RpcError):
            pass
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)
