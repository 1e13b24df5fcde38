"""Shared fixtures: real redis-server, real API/inference servers and Celery worker processes.

Everything runs on loopback with free ports and a temp data directory; nothing here
touches a Redis at 6379 or any state outside tmp.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from lmforge.v1 import common_pb2, training_pb2, training_pb2_grpc
from lmforge_server.redis_server import RedisServer
from lmforge_server.settings import Settings
from lmforge_server.stack import BUNDLED_CORPUS, Stack

# One torch thread in the test process, like the stack's workers (torch_threads=1), unless
# LMFORGE_TEST_TORCH_THREADS says otherwise: on this shared 2-core machine one A/B under
# load 6 gave 48 s (1 thread) against 101 s (2) for test_training + test_model; a later
# alternating run of three training tests showed no difference (5-6.6 s either way).
TORCH_THREADS = int(os.environ.get("LMFORGE_TEST_TORCH_THREADS", "1"))
torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Every test starts with the session's torch thread count. A module that set its own at
    import leaked it into every module after it (test_model's 2 threads made the training
    tests of test_training.py take 4-15x the CPU time, spinning on two loaded cores)."""
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


CORPUS = BUNDLED_CORPUS.read_text()
# About 60 KB of Shakespeare: enough for a tiny model's loss to fall.
SMALL_CORPUS = CORPUS[:60_000]


def register_ready_model(store, model_id: str, owner: str, name: str, path: Path) -> None:
    """Registers the model directory `path` as version 1 of `owner`'s READY model `name`, in
    Redis as a worker's export would (the record, the owner's list, the name's versions), for
    tests that serve a hand-built model without training one."""
    from lmforge_server import store as st

    rec = st.ModelRecord(
        id=model_id, owner=owner, name=name, version=1, job_id="job_none",
        state=st.MODEL_READY, spec={"model": {}}, parameters={}, path=str(path),
        created_at=time.time(),
    )  # fmt: skip
    store.r.hset(f"{st.P}model:{rec.id}", mapping=st._encode(rec))
    store.r.zadd(f"{st.P}models:{owner}", {rec.id: rec.created_at})
    store.r.zadd(f"{st.P}modelname:{owner}:{name}", {rec.id: 1})
    store.r.incr(f"{st.P}modelver:{owner}:{name}")


def make_settings(data_dir: Path, **overrides) -> Settings:
    base = dict(
        data_dir=data_dir,
        api_addr="127.0.0.1:0",
        inference_addr="127.0.0.1:0",
        # Free ports for the gateway and the metrics endpoints too: a fixed default port is
        # taken by whatever else runs on the machine (another suite, a developer's stack).
        http_addr="127.0.0.1:0",
        api_metrics_addr="127.0.0.1:0",
        inference_metrics_addr="127.0.0.1:0",
        worker_metrics_addr="127.0.0.1:0",
        # Long enough that a heartbeat starved on a loaded CI machine keeps its lease.
        lease_ttl_s=5.0,
        reaper_interval_s=0.5,
        # A 2 s lease can lapse on a loaded CI machine (an ONNX export holds the CPU); such
        # a job is requeued and resumed. Poison-job tests set max_attempts themselves.
        max_attempts=20,
        torch_threads=1,
        # Tests read an attempt's best weights and checkpoints in the worker's scratch.
        keep_scratch=True,
        device="cpu",
        inference_device="cpu",
    )
    base.update(overrides)
    return Settings(**base)


BUCKET = "lmforge-test"


def _start_moto():
    """moto's S3 server starting on a free loopback port: (process, url)."""
    import subprocess
    import sys

    from lmforge_server.redis_server import dying_with_this_process, free_port

    port = free_port("127.0.0.1")
    # Dies with this process, even SIGKILLed (a killed pytest left moto running before).
    moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(
        dying_with_this_process(moto),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}"


# moto started when collection ends if a selected test may use S3: its start (a second or
# two of imports) then overlaps the tests before the first S3 one instead of delaying it.
_EARLY_MOTO: list = []


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, with one bucket (the way s3fs's own tests
    run against a real S3 protocol endpoint). In a process of its own: in this one it would
    compete for the GIL with the test driving the servers."""
    import urllib.request

    # A hard import, not importorskip: the S3 tests must fail, not silently skip, where the
    # test extra (s3fs[boto3], moto[server]) is missing.
    import boto3  # noqa: F401

    proc, url = _EARLY_MOTO.pop() if _EARLY_MOTO else _start_moto()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto did not start"
                time.sleep(0.05)
        # s3fs.mkdir sends a LocationConstraint that moto rejects in us-east-1: use boto3.
        s3_client(url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.kill()
        proc.wait()


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def store_settings(request, backend: str) -> dict:
    """Settings overrides for an artifact store on `backend`: "local" (the data directory's
    default) or "s3" (a fresh prefix in the moto server's bucket)."""
    if backend == "local":
        return {}
    return dict(
        artifacts=f"s3://{BUCKET}/{uuid.uuid4().hex}",
        s3_endpoint_url=request.getfixturevalue("s3_endpoint"),
        s3_region="us-east-1",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
    )


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """One whole stack (Redis, API, inference, one worker) shared by the session's tests."""
    # init_from may name directories under base-models/ (the operator's allow-list).
    root = tmp_path_factory.mktemp("stack")
    # tensorboard: workers also write event files (test_training_control reads them back).
    settings = make_settings(root, base_model_dirs=[str(root / "base-models")], tensorboard=True)
    (root / "base-models").mkdir()
    with Stack(settings) as s:
        yield s


@pytest.fixture(scope="session")
def api_channel(stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.api_addr) as channel:
        yield channel


class Api:
    """Stubs of the training API on one channel, with the few helpers tests repeat."""

    def __init__(self, channel: grpc.Channel, metadata=()):
        self.datasets = training_pb2_grpc.DatasetServiceStub(channel)
        self.jobs = training_pb2_grpc.JobServiceStub(channel)
        self.models = training_pb2_grpc.ModelServiceStub(channel)
        self.metadata = tuple(metadata)

    def upload(self, data: bytes, name: str = "corpus", sha256: str | None = None, chunk=64 << 10):
        def requests():
            yield training_pb2.UploadDatasetRequest(
                header=training_pb2.UploadDatasetHeader(
                    name=name, sha256=sha256 or hashlib.sha256(data).hexdigest()
                )
            )
            for i in range(0, len(data), chunk):
                yield training_pb2.UploadDatasetRequest(chunk=data[i : i + chunk])

        return self.datasets.UploadDataset(requests(), metadata=self.metadata, timeout=30)

    def create(self, dataset_id: str, preset="tiny", request_id="", model_name="", **fields):
        model = {k[6:]: v for k, v in fields.items() if k.startswith("model_")}
        training = {k: v for k, v in fields.items() if not k.startswith("model_")}
        spec = training_pb2.JobSpec(
            preset=preset,
            model=common_pb2.ModelSpec(**model),
            training=common_pb2.TrainingSpec(**training),
        )
        return self.jobs.CreateJob(
            training_pb2.CreateJobRequest(
                dataset_id=dataset_id, spec=spec, request_id=request_id, model_name=model_name
            ),
            metadata=self.metadata,
            timeout=30,
        )

    def get(self, job_id: str) -> training_pb2.Job:
        return self.jobs.GetJob(training_pb2.GetJobRequest(id=job_id), metadata=self.metadata)

    def events(self, job_id: str, after: str = "", timeout: float = 300):
        return list(
            self.jobs.WatchJob(
                training_pb2.WatchJobRequest(id=job_id, after_event_id=after),
                metadata=self.metadata,
                timeout=timeout,
            )
        )

    def events_so_far(self, job_id: str, wait: float = 1.5) -> list:
        """The events of a job that may still run: watch until a short deadline."""
        out = []
        stream = self.jobs.WatchJob(
            training_pb2.WatchJobRequest(id=job_id), metadata=self.metadata, timeout=wait
        )
        try:
            out.extend(stream)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        return out

    def wait_for(self, job_id: str, predicate, timeout: float = 120.0) -> training_pb2.Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # a GetJob every 50 ms: cheap on loopback
            job = self.get(job_id)
            if predicate(job):
                return job
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} never matched; last: {job}")

    def wait_terminal(self, job_id: str, timeout: float = 240.0) -> training_pb2.Job:
        terminal = {
            training_pb2.JOB_STATE_SUCCEEDED,
            training_pb2.JOB_STATE_FAILED,
            training_pb2.JOB_STATE_CANCELLED,
        }
        return self.wait_for(job_id, lambda j: j.state in terminal, timeout)


@pytest.fixture(scope="session")
def api(api_channel) -> Api:
    return Api(api_channel)


@pytest.fixture(scope="session")
def small_dataset(api) -> training_pb2.Dataset:
    return api.upload(SMALL_CORPUS.encode(), name="shakespeare-60k")


@pytest.fixture(scope="session")
def tiny_shakespeare(api, small_dataset):
    """One 60-step tiny model trained on the session stack, for tests that only read it:
    (the created job, its events, the finished job)."""
    job = api.create(small_dataset.id, model_name="tiny-shakespeare", max_steps=60)
    events = api.events(job.id)
    return job, events, api.get(job.id)


def model_dir(stack: Stack, model_id: str) -> Path:
    """The local directory of a registered model's published files (read through the
    stack's artifact store, as the inference server reads it)."""
    from lmforge_server.artifacts import ArtifactStore
    from lmforge_server.store import Store

    rec = Store.from_url(stack.settings.redis_url).model(model_id)
    return ArtifactStore.from_settings(stack.settings).local_dir(rec.path)


def stored_checkpoints(stack: Stack, job_id: str) -> dict[int, str]:
    """{step: store key} of the job's checkpoints in the stack's artifact store."""
    from lmforge_server.artifacts import ArtifactStore

    store = ArtifactStore.from_settings(stack.settings).objects
    found = {}
    for obj in store.list(f"jobs/{job_id}/checkpoints"):
        parts = obj.key.split("/")
        if parts[-1] == "manifest.json" and parts[-2].startswith("step-"):
            found[int(parts[-2].removeprefix("step-"))] = "/".join(parts[:-1])
    return dict(sorted(found.items()))


def stored_checkpoint_file(stack: Stack, job_id: str, step: int) -> Path:
    """The local file of the job's checkpoint at `step`, read through the artifact store."""
    from lmforge_server.artifacts import ArtifactStore

    key = stored_checkpoints(stack, job_id)[step]
    return ArtifactStore.from_settings(stack.settings).checkpoint_file(key)


def job_scratch(stack: Stack, job_id: str) -> Path:
    """The worker's local work space of a job (per-attempt data, best weights, checkpoints)."""
    return stack.settings.data_dir / "scratch" / "jobs" / job_id


def unique(prefix: str = "r") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _no_cuda_reason() -> str | None:
    """Why CUDA tests cannot run here, or None when they can."""
    import torch

    if torch.version.cuda is None:
        return f"no CUDA: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"no CUDA GPU visible (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return None


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip, saying why, on a machine without CUDA (CI); non-strict
    xfails count as slow."""
    # A non-strict xfail cannot fail the run (a pass is XPASS, a failure XFAIL): it tells the
    # edit-test loop nothing, so it runs with the slow tests (CI runs it all the same).
    for item in items:
        xfail = item.get_closest_marker("xfail")
        if xfail is not None and not xfail.kwargs.get("strict", config.getini("xfail_strict")):
            item.add_marker(pytest.mark.slow)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    reason = _no_cuda_reason() if gpu_items else None
    for item in gpu_items if reason else []:
        item.add_marker(pytest.mark.skip(reason=reason))


def pytest_collection_finish(session):
    # Collection imports torch, transformers, onnx, grpc...: ~340k objects that live for the
    # whole session. Frozen, every full garbage collection stops walking them again.
    gc.freeze()
    if not session.config.option.collectonly and any("s3" in i.nodeid for i in session.items):
        _EARLY_MOTO.append(_start_moto())


def pytest_sessionfinish(session):
    for proc, _ in _EARLY_MOTO:  # started, but no test asked for it
        proc.kill()
        proc.wait()
