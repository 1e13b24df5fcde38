"""The training API's contract over real gRPC: uploads, spec validation, idempotency,
tenancy, pagination. Training itself is in test_training_service.py."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from conftest import SMALL_CORPUS, Api, unique

from lmforge.v1 import training_pb2


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


def test_upload_is_content_addressed_and_counts_characters(api):
    data = f"hello {unique()} world\n".encode()
    first = api.upload(data, name="hello")
    again = api.upload(data, name="hello-again")
    assert first.id == again.id == hashlib.sha256(data).hexdigest()
    assert first.size_bytes == len(data)
    assert first.num_distinct_chars == len(set(data.decode()))
    assert api.datasets.GetDataset(training_pb2.GetDatasetRequest(id=first.id)).name == "hello"


def test_upload_with_wrong_sha256_is_rejected_naming_the_field(api):
    with pytest.raises(grpc.RpcError) as e:
        api.upload(b"some text", sha256="0" * 64)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256" in e.value.details()


def test_upload_that_is_not_utf8_is_rejected(api):
    with pytest.raises(grpc.RpcError) as e:
        api.upload(b"caf\xc3(" + b"x" * 10)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in e.value.details()


def test_upload_of_nothing_is_rejected(api):
    with pytest.raises(grpc.RpcError) as e:
        api.upload(b"")
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in e.value.details()


def test_upload_over_the_size_limit_is_resource_exhausted(api, stack):
    limit = stack.settings.max_upload_bytes

    def declared_too_big():
        yield training_pb2.UploadDatasetRequest(
            header=training_pb2.UploadDatasetHeader(sha256="a" * 64, size_bytes=limit + 1)
        )

    with pytest.raises(grpc.RpcError) as e:
        api.datasets.UploadDataset(declared_too_big())
    assert _code(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(limit) in e.value.details()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_upload_streaming_past_the_limit_is_stopped(request, tmp_path, backend):
    from conftest import make_settings, store_settings

    from lmforge_server.artifacts import ArtifactStore
    from lmforge_server.stack import Stack

    settings = make_settings(tmp_path, max_upload_bytes=1000, **store_settings(request, backend))
    with Stack(settings, inference=False, worker=False) as s:
        with grpc.insecure_channel(s.api_addr) as channel:
            with pytest.raises(grpc.RpcError) as e:
                Api(channel).upload(b"x" * 5000, chunk=100)
    assert _code(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1000 bytes" in e.value.details()
    # Nothing half-written stays in the artifact store, nor in the server's upload space.
    assert ArtifactStore.from_settings(settings).objects.list() == []
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]


def test_upload_must_start_with_a_header(api):
    with pytest.raises(grpc.RpcError) as e:
        api.datasets.UploadDataset(iter([training_pb2.UploadDatasetRequest(chunk=b"abc")]))
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    assert "header" in e.value.details()


@pytest.mark.parametrize(
    "fields, field_name",
    [
        (dict(model_n_heads=3, model_d_model=32), "spec.model.d_model"),
        (dict(model_n_kv_heads=3, model_n_heads=4), "spec.model.n_kv_heads"),
        (dict(model_n_layers=0), "spec.model.n_layers"),
        (dict(model_tokenizer="words"), "spec.model.tokenizer"),
        (dict(model_dropout=1.5), "spec.model.dropout"),
        (dict(model_vocab_size=100), "spec.model.vocab_size"),
        (dict(max_steps=0), "spec.training.max_steps"),
        (dict(learning_rate=-1.0), "spec.training.learning_rate"),
        (dict(min_learning_rate=1.0), "spec.training.min_learning_rate"),
        (dict(beta2=1.0), "spec.training.beta2"),
        (dict(val_fraction=0.9), "spec.training.val_fraction"),
        (dict(precision="fp8"), "spec.training.precision"),
        (dict(compile="maybe"), "spec.training.compile"),
        (dict(batch_size=100000), "spec.training.batch_size"),
        (dict(init_from="no-such-model"), "spec.training.init_from"),
    ],
)
def test_bad_spec_is_rejected_naming_the_field(api, small_dataset, fields, field_name):
    with pytest.raises(grpc.RpcError) as e:
        api.create(small_dataset.id, **fields)
    assert _code(e) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert field_name in e.value.details()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(devices=0), "spec.training.devices: must be between 1 and 64, got 0"),
        (
            dict(devices=16, batch_size=16),
            "spec.training.devices: must be at most 8 (the largest worker of this deployment)",
        ),
        (dict(nodes=0), "spec.training.nodes: must be between 1 and 64, got 0"),
        (dict(nodes=2, batch_size=8), "spec.training.nodes: must be 1 for queued jobs, got 2"),
        (
            dict(devices=3, batch_size=8),
            "spec.training.batch_size: must be divisible by training.devices * training.nodes"
            " (3), got 8",
        ),
    ],
)
def test_devices_beyond_the_fleet_or_the_batch_are_rejected_naming_field_and_limit(
    api, small_dataset, fields, message
):
    with pytest.raises(grpc.RpcError) as e:
        api.create(small_dataset.id, **fields)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


def test_unknown_preset_and_dataset_are_named(api, small_dataset):
    with pytest.raises(grpc.RpcError) as e:
        api.create(small_dataset.id, preset="huge")
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "preset" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        api.create("f" * 64)
    assert _code(e) == grpc.StatusCode.NOT_FOUND and "dataset_id" in e.value.details()


def test_created_job_carries_the_exact_parameter_count(api, small_dataset):
    job = api.create(
        small_dataset.id, model_n_layers=2, model_n_heads=4, model_n_kv_heads=2, model_d_model=64
    )
    p = job.parameters
    vocab = small_dataset.num_distinct_chars + 1
    d, ff = 64, 192  # 8/3 * 64 rounded up to 64
    assert p.embedding == vocab * d
    assert p.attention == 2 * (2 * d * d + 2 * d * 32)
    assert p.mlp == 2 * 3 * d * ff
    assert p.norm == 5 * d
    assert p.total == p.embedding + p.attention + p.mlp + p.norm
    assert p.flops_per_token > 6 * (p.attention + p.mlp)
    assert job.spec.model.vocab_size == vocab and job.spec.preset == "tiny"
    api.jobs.CancelJob(training_pb2.CancelJobRequest(id=job.id))


def test_same_request_id_twice_gives_one_job(api, small_dataset):
    rid = unique("req")
    first = api.create(small_dataset.id, request_id=rid, max_steps=5)
    second = api.create(small_dataset.id, request_id=rid, max_steps=5)
    assert first.id == second.id
    listed = api.jobs.ListJobs(training_pb2.ListJobsRequest(page_size=1000)).jobs
    assert sum(1 for j in listed if j.request_id == rid) == 1
    api.jobs.CancelJob(training_pb2.CancelJobRequest(id=first.id))


def test_list_jobs_pages_and_filters_by_state(api, small_dataset):
    for _ in range(3):
        job = api.create(small_dataset.id, max_steps=5)
        api.jobs.CancelJob(training_pb2.CancelJobRequest(id=job.id))
    seen, token = [], ""
    while True:
        page = api.jobs.ListJobs(training_pb2.ListJobsRequest(page_size=2, page_token=token))
        assert len(page.jobs) <= 2
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) >= 3
    cancelled = api.jobs.ListJobs(
        training_pb2.ListJobsRequest(page_size=1000, state=training_pb2.JOB_STATE_CANCELLED)
    ).jobs
    assert cancelled and all(j.state == training_pb2.JOB_STATE_CANCELLED for j in cancelled)
    with pytest.raises(grpc.RpcError) as e:
        api.jobs.ListJobs(training_pb2.ListJobsRequest(page_size=5000))
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in e.value.details()


def test_unknown_job_is_not_found_and_a_missing_id_is_invalid(api):
    with pytest.raises(grpc.RpcError) as e:
        api.get("job_doesnotexist")
    assert _code(e) == grpc.StatusCode.NOT_FOUND
    for call in (
        lambda: api.get(""),
        lambda: api.models.GetModel(training_pb2.GetModelRequest(id="")),
        lambda: api.jobs.CancelJob(training_pb2.CancelJobRequest(id="")),
        lambda: api.events(""),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "id" in e.value.details()


def test_list_jobs_with_an_unknown_state_is_invalid_argument(api):
    with pytest.raises(grpc.RpcError) as e:
        api.jobs.ListJobs(training_pb2.ListJobsRequest(state=99))
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "state" in e.value.details()


@pytest.fixture(scope="module")
def keyed_api_stack(tmp_path_factory):
    """An API server with keys on and two active jobs per owner, shared by the tests here
    that need one: each test uses tenants of its own."""
    from conftest import make_settings

    from lmforge_server.stack import Stack

    keys = {f"key-{name}": name for name in ("alice", "bob", "carol")}
    settings = make_settings(
        tmp_path_factory.mktemp("keyed-api"), api_keys=keys, max_queued_jobs_per_owner=2
    )
    with Stack(settings, inference=False, worker=False) as s:
        yield s


def test_tenants_never_see_each_other(keyed_api_stack):
    with grpc.insecure_channel(keyed_api_stack.api_addr) as channel:
        alice = Api(channel, [("authorization", "Bearer key-alice")])
        bob = Api(channel, [("authorization", "Bearer key-bob")])
        anonymous = Api(channel)
        ds = alice.upload(SMALL_CORPUS[:2000].encode())
        job = alice.create(ds.id, max_steps=5)
        assert job.owner == "alice"
        with pytest.raises(grpc.RpcError) as e:
            bob.get(job.id)
        assert _code(e) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            bob.create(ds.id)
        assert _code(e) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            bob.jobs.CancelJob(training_pb2.CancelJobRequest(id=job.id), metadata=bob.metadata)
        assert _code(e) == grpc.StatusCode.NOT_FOUND
        assert not bob.jobs.ListJobs(training_pb2.ListJobsRequest(), metadata=bob.metadata).jobs
        with pytest.raises(grpc.RpcError) as e:
            anonymous.get(job.id)
        assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
        assert alice.get(job.id).state == training_pb2.JOB_STATE_QUEUED


def test_too_many_active_jobs_is_resource_exhausted_until_one_ends(keyed_api_stack):
    with grpc.insecure_channel(keyed_api_stack.api_addr) as channel:
        api = Api(channel, [("authorization", "Bearer key-carol")])
        ds = api.upload(SMALL_CORPUS[:2000].encode())
        first = api.create(ds.id)
        api.create(ds.id)
        with pytest.raises(grpc.RpcError) as e:
            api.create(ds.id)
        assert _code(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit per owner is 2" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            api.datasets.DeleteDataset(
                training_pb2.DeleteDatasetRequest(id=ds.id), metadata=api.metadata
            )
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
        api.jobs.CancelJob(training_pb2.CancelJobRequest(id=first.id), metadata=api.metadata)
        assert api.create(ds.id).state == training_pb2.JOB_STATE_QUEUED


def test_a_unary_call_is_answered_while_an_upload_is_being_hashed_and_written(
    redis_server, tmp_path, monkeypatch
):
    """Hashing and writing an upload run in the server's thread pool, never on its event
    loop: with the upload's write held mid-stream by a gate, a unary call on the same
    server is still answered, before the gate opens (an ordering, not a timing)."""
    import asyncio
    import shutil
    import tempfile
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from conftest import make_settings

    from lmforge_server import api as api_server
    from lmforge_server import datasets

    held, release = threading.Event(), threading.Event()
    gate = {"timed_out": False}
    write = datasets._Sink.write

    def gated_write(self, chunk):
        if not held.is_set():  # the first chunk waits at the gate
            held.set()
            # On the event loop this blocks every call; the gate gives up so the test ends.
            if not release.wait(15):
                gate["timed_out"] = True
        return write(self, chunk)

    monkeypatch.setattr(datasets._Sink, "write", gated_write)
    # The server runs in this process (its event loop in a thread) so the gate reaches it,
    # on a unix socket of its own (no free port to pick, nothing to race for).
    sock_dir = tempfile.mkdtemp(prefix="lmf-")  # short: a socket path has ~107 bytes
    addr = f"unix:{sock_dir}/api.sock"
    settings = make_settings(tmp_path, redis_url=redis_server.url, api_addr=addr)
    running: dict = {}

    async def serve():
        running["loop"], running["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await api_server.serve(settings, stop=running["stop"])

    server = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    server.start()
    try:
        # Reconnect every 50 ms while the server starts (gRPC's default backoff is 1 s).
        fast = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 50)]
        with grpc.insecure_channel(addr, fast) as channel, ThreadPoolExecutor(1) as pool:
            grpc.channel_ready_future(channel).result(timeout=60)
            api = Api(channel)
            data = b"to be hashed off the loop\n" * 4000
            upload = pool.submit(api.upload, data, "gated", None, 16 << 10)
            assert held.wait(60), "the upload never reached its first write"
            api.datasets.ListDatasets(training_pb2.ListDatasetsRequest(), timeout=60)
            answered_while_held = not release.is_set() and not gate["timed_out"]
            release.set()
            assert answered_while_held, "a unary call waited for the upload's hashing and writing"
            assert upload.result().id == hashlib.sha256(data).hexdigest()
    finally:
        release.set()
        if "loop" in running:
            running["loop"].call_soon_threadsafe(running["stop"].set)
        server.join(30)
        shutil.rmtree(sock_dir, ignore_errors=True)
