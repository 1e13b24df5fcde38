"""Per-tenant quotas and retention (issue 8): datasets and stored bytes, concurrent
generation streams, and finished jobs that expire. Real Redis and real gRPC servers."""

from __future__ import annotations

import time

import grpc
import pytest
from conftest import Api, make_settings, register_ready_model

from lmforge.v1 import inference_pb2, training_pb2
from lmforge_server import store as st
from lmforge_server.stack import Stack

S = training_pb2


def _code(call, *a, **kw):
    try:
        call(*a, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


# Tenants of the shared stack; each test uses its own.
TENANTS = ("alice", "bob", "carol", "dave", "erin", "frank")


@pytest.fixture(scope="module")
def quota_stack(tmp_path_factory):
    """One API and inference server with small per-tenant quotas, shared by the tests here:
    each test uses tenants of its own, so one's usage never counts against another's."""
    settings = make_settings(
        tmp_path_factory.mktemp("quotas"),
        api_keys={f"k-{name}": name for name in TENANTS},
        max_datasets_per_owner=2,
        max_stored_bytes_per_owner=3000,
        max_queued_jobs_per_owner=1,
        max_generations_per_owner=1,
        max_new_tokens_limit=4000,
    )
    with Stack(settings, worker=False) as s:
        yield s


def _auth(name: str) -> tuple:
    return (("authorization", f"Bearer k-{name}"),)


def test_dataset_count_and_stored_bytes_are_capped_per_tenant(quota_stack):
    with grpc.insecure_channel(quota_stack.api_addr) as ch:
        alice = Api(ch, _auth("alice"))
        bob = Api(ch, _auth("bob"))
        first = alice.upload(b"a" * 1000)
        alice.upload(b"b" * 1000)
        alice.upload(b"a" * 1000)  # the same content again is no new dataset
        code, details = _code(alice.upload, b"c" * 10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_datasets_per_owner" in details and "2" in details
        bob.upload(b"c" * 2500)  # another tenant has quotas of its own
        code, details = _code(bob.upload, b"d" * 600)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_stored_bytes_per_owner" in details and "3000" in details
        # Deleting frees both.
        alice.datasets.DeleteDataset(S.DeleteDatasetRequest(id=first.id), metadata=alice.metadata)
        assert alice.upload(b"c" * 10).size_bytes == 10


def test_finished_jobs_expire_after_the_retention_and_leave_lists_clean(redis_server):
    store = st.Store.from_url(redis_server.url)
    ds = st.DatasetRecord("d" * 64, "o", "d", "d" * 64, 1, 1, 1, 0.0, "/nowhere")
    store.put_dataset(ds)
    jobs = []
    for _ in range(2):
        job = st.JobRecord(
            id=st.new_id("job"),
            owner="o",
            dataset_id=ds.id,
            model_name="m",
            model_id=st.new_id("mdl"),
            state=st.QUEUED,
            spec={},
            parameters={},
            created_at=time.time(),
        )
        jobs.append(store.create_job(job, max_active=10)[0])
    store.retention_s = 1.0
    # A kept checkpoint's registry entry (written by the worker) goes with its job.
    store.r.hset(f"{st.P}job:{jobs[0].id}:checkpoints", "5", "{}")
    store.request_cancel("o", jobs[0].id)  # ends it: CANCELLED
    assert store.r.ttl(f"{st.P}job:{jobs[0].id}") > 0
    assert store.r.ttl(f"{st.P}job:{jobs[0].id}:events") > 0
    assert store.r.ttl(f"{st.P}job:{jobs[0].id}:checkpoints") > 0
    assert store.r.ttl(f"{st.P}job:{jobs[1].id}") == -1  # active jobs never expire
    deadline = time.monotonic() + 30
    while store.r.exists(f"{st.P}job:{jobs[0].id}"):  # until Redis expires it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    listed, _ = store.list_jobs("o", 0, 10)
    assert [j.id for j in listed] == [jobs[1].id]
    with pytest.raises(st.NotFound):
        store.get_job("o", jobs[0].id)


def test_concurrent_generations_are_capped_per_tenant(quota_stack, tmp_path):
    from _tiny_models import build_cycle_model_dir

    store = st.Store.from_url(quota_stack.settings.redis_url)
    model_dir = build_cycle_model_dir(tmp_path / "models" / "cyc", b"abc", context_length=4096)
    for owner in ("carol", "dave"):
        register_ready_model(store, f"mdl_{owner}", owner, "cyc", model_dir)
    with grpc.insecure_channel(quota_stack.inference_addr) as ch:
        kw = dict(
            request_serializer=inference_pb2.GenerateRequest.SerializeToString,
            response_deserializer=inference_pb2.GenerateStreamResponse.FromString,
        )
        stream_call = ch.unary_stream("/lmforge.v1.InferenceService/GenerateStream", **kw)
        unary = ch.unary_unary(
            "/lmforge.v1.InferenceService/Generate",
            request_serializer=inference_pb2.GenerateRequest.SerializeToString,
            response_deserializer=inference_pb2.GenerateResponse.FromString,
        )
        long = inference_pb2.GenerateRequest(
            model="cyc",
            prompt="a",
            sampling=inference_pb2.SamplingParams(max_new_tokens=4000, temperature=0),
        )
        short = inference_pb2.GenerateRequest(
            model="cyc", prompt="a", sampling=inference_pb2.SamplingParams(max_new_tokens=2)
        )
        carol = _auth("carol")
        stream = stream_call(long, metadata=carol, timeout=60)
        next(stream)  # carol's one generation is running
        code, details = _code(unary, short, metadata=carol, timeout=30)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_generations_per_owner" in details and "1" in details
        dave = _auth("dave")
        assert unary(short, metadata=dave, timeout=30).usage.completion_tokens == 2
        stream.cancel()
        for _ in range(100):  # the slot comes back once the cancelled stream ends
            if _code(unary, short, metadata=carol, timeout=30)[0] == grpc.StatusCode.OK:
                break
            time.sleep(0.1)
        else:
            pytest.fail("a cancelled generation never gave its slot back")


def test_a_paused_job_keeps_its_queue_slot_and_only_its_owner_resumes_it(quota_stack):
    with grpc.insecure_channel(quota_stack.api_addr) as ch:
        erin = Api(ch, _auth("erin"))
        frank = Api(ch, _auth("frank"))
        ds = erin.upload(b"some text to train on " * 50)
        job = erin.create(ds.id, max_steps=5)
        paused = erin.jobs.PauseJob(S.PauseJobRequest(id=job.id), metadata=erin.metadata)
        assert paused.state == S.JOB_STATE_PAUSED
        # Resuming must never exceed the quota: the paused job still holds its slot.
        code, details = _code(erin.create, ds.id, max_steps=5)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued_jobs_per_owner" in details
        for call, request in (
            (frank.jobs.ResumeJob, S.ResumeJobRequest(id=job.id)),
            (frank.jobs.PauseJob, S.PauseJobRequest(id=job.id)),
            (frank.jobs.ListCheckpoints, S.ListCheckpointsRequest(id=job.id)),
        ):
            assert _code(call, request, metadata=frank.metadata)[0] == grpc.StatusCode.NOT_FOUND
        assert erin.get(job.id).state == S.JOB_STATE_PAUSED
        resumed = erin.jobs.ResumeJob(S.ResumeJobRequest(id=job.id), metadata=erin.metadata)
        assert resumed.state == S.JOB_STATE_QUEUED
