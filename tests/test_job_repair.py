"""No job is left without a task and none loops forever: poison jobs end FAILED after
max_attempts, and a job whose enqueue failed is enqueued (by a retry with the same
request_id, or by the reaper) and finishes. Real Redis, real API server, real workers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time

import grpc
import pytest
from conftest import SMALL_CORPUS, Api, make_settings

from lmforge.v1 import training_pb2
from lmforge_server import jobs, reaper
from lmforge_server import store as st
from lmforge_server.stack import Child, Stack
from lmforge_server.taskqueue import make_celery
from lmforge_worker import runner

S = training_pb2


def _job(store: st.Store, dataset: st.DatasetRecord, **kw) -> st.JobRecord:
    job = st.JobRecord(
        id=st.new_id("job"),
        owner="default",
        dataset_id=dataset.id,
        model_name="m",
        model_id=st.new_id("mdl"),
        state=st.QUEUED,
        spec={},
        parameters={},
        created_at=time.time(),
        **kw,
    )
    return store.create_job(job, max_active=100)[0]


@pytest.fixture
def store_and_settings(redis_server, tmp_path):
    settings = make_settings(tmp_path, redis_url=redis_server.url, max_attempts=3)
    store = st.Store.from_url(redis_server.url)
    ds = st.DatasetRecord("d" * 64, "default", "d", "d" * 64, 1, 1, 1, 0.0, "/nowhere")
    store.put_dataset(ds)
    return store, settings, ds


def test_a_job_whose_worker_dies_every_attempt_ends_failed_after_max_attempts(
    store_and_settings,
):
    store, settings, ds = store_and_settings
    celery = make_celery(settings)
    job = _job(store, ds)
    for attempt in range(1, 4):
        leased = store.acquire(job.id, f"w{attempt}", ttl_s=0.2, device="cpu")
        assert leased.attempt == attempt
        store.record_progress(job.id, attempt, f"w{attempt}", {"step": 10 * attempt})
        time.sleep(0.3)  # the worker died: no heartbeat, the lease lapses
        reaper.sweep(settings, store, celery)
    done = store.job(job.id)
    assert done.state == st.FAILED
    assert done.error == "worker lost 3 times (last seen at step 30)"
    assert store.model(job.model_id).state == st.MODEL_ABANDONED
    assert not store.r.sismember(f"{st.P}jobs:active:default", job.id)  # the slot is free


def test_a_queued_job_whose_task_died_on_pick_up_is_found_stalled(store_and_settings):
    store, settings, ds = store_and_settings
    never_sent = _job(store, ds)
    sent = _job(store, ds)
    store.mark_enqueued(sent.id)
    assert store.stalled_queued(grace_s=60) == []  # young jobs are left alone
    time.sleep(0.3)
    assert store.stalled_queued(grace_s=0.2) == [never_sent.id]
    store.mark_picked(sent.id)  # a worker got the task, then died before the lease
    time.sleep(0.3)
    assert sorted(store.stalled_queued(grace_s=0.2)) == sorted([never_sent.id, sent.id])
    store.acquire(sent.id, "w", ttl_s=30, device="cpu")  # leased: not stalled
    assert store.stalled_queued(grace_s=0.2) == [never_sent.id]


def _create_with_a_dead_broker(settings, store, owner_ds, request_id: str) -> str:
    """CreateJob's core with the broker unreachable: the job is saved, the enqueue fails."""
    dead = make_celery(dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0"))
    req = jobs.CreateRequest(
        dataset_id=owner_ds.id, preset="tiny", training={"max_steps": 5}, request_id=request_id
    )
    with pytest.raises(Exception):  # noqa: B017 - kombu's OperationalError, whatever its class
        jobs.create(settings, store, dead, "default", req)
    (job_id,) = [j.id for j in store.list_jobs("default", 0, 100)[0] if j.request_id == request_id]
    assert store.job(job_id).state == st.QUEUED and not store.job(job_id).enqueued_at
    return job_id


@pytest.mark.slow
def test_a_job_whose_enqueue_failed_is_enqueued_and_finishes(tmp_path):
    settings = make_settings(tmp_path, requeue_stalled_after_s=6.0)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS[:5000].encode())
        store = st.Store.from_url(stack.settings.redis_url)
        rec = store.get_dataset("default", ds.id)
        by_reaper = _create_with_a_dead_broker(stack.settings, store, rec, "rq-reaper")
        by_retry = _create_with_a_dead_broker(stack.settings, store, rec, "rq-retry")
        # The client retries with the same request_id: same job, enqueued this time (a
        # worker picks it up; it is cancelled then, to spare CI a second export).
        assert api.create(ds.id, request_id="rq-retry", max_steps=5).id == by_retry
        api.wait_for(by_retry, lambda j: j.attempt >= 1, timeout=120)
        api.jobs.CancelJob(S.CancelJobRequest(id=by_retry))
        done = api.wait_terminal(by_reaper, timeout=240)
        assert done.state == S.JOB_STATE_SUCCEEDED, done.error
        api_log = next(c for c in stack.children if c.role == "api").log_tail(200_000)
        assert f"job {by_reaper}: queued without a task" in api_log
        assert f"job {by_retry}: queued without a task" not in api_log


@pytest.mark.slow
@pytest.mark.fault
def test_a_poison_job_killing_its_worker_every_attempt_ends_failed(tmp_path):
    settings = make_settings(tmp_path, max_attempts=2)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS.encode())
        job = api.create(ds.id, max_steps=100_000, checkpoint_interval=100_000)
        for attempt in (1, 2):
            api.wait_for(
                job.id, lambda j, a=attempt: j.attempt == a and j.progress.step > 0, timeout=120
            )
            for child in [c for c in stack.children if c.role == "worker"]:
                child.kill()  # what an OOM kill or a segfault does
                stack.children.remove(child)
            if attempt == 1:
                logs = tmp_path / f"logs{attempt}"
                stack.children.append(Child("worker", stack.settings, logs).start())
        done = api.wait_terminal(job.id, timeout=60)
        assert done.state == S.JOB_STATE_FAILED
        assert done.error.startswith("worker lost 2 times (last seen at step ")
        assert api.models.GetModel(S.GetModelRequest(id=job.model_id)).state == (
            S.MODEL_STATE_ABANDONED
        )


def _local_artifacts(root):
    from lmforge_server.artifacts import ArtifactStore
    from lmforge_server.objectstore import LocalObjectStore

    return ArtifactStore(LocalObjectStore(root / "store"), root / "cache", 1 << 30, root / "tmp")


def test_a_zombie_attempt_never_replaces_the_registered_models_files(store_and_settings, tmp_path):
    store, settings, ds = store_and_settings
    artifacts = _local_artifacts(tmp_path)
    job = _job(store, ds)
    zombie = store.acquire(job.id, "zombie", ttl_s=0.2, device="cpu")
    time.sleep(0.3)  # the zombie stalls (GC pause, SIGSTOP); its lease lapses
    assert store.recover_orphan(job.id, settings.max_attempts) == st.QUEUED
    holder = store.acquire(job.id, "holder", ttl_s=30, device="cpu")
    assert (zombie.attempt, holder.attempt) == (1, 2)

    def export(attempt: int, text: str) -> str:
        staged = tmp_path / f"export-{attempt}"
        staged.mkdir(exist_ok=True)
        (staged / "model.onnx").write_text(text)
        return artifacts.put_model(job.model_id, attempt, staged)

    def served(key: str) -> str:
        return (artifacts.local_dir(key) / "model.onnx").read_text()

    # The zombie publishes first, under its attempt's key, but cannot register it.
    by_zombie = export(1, "zombie")
    with pytest.raises(st.LeaseLost):
        store.finish(job.id, 1, "zombie", st.SUCCEEDED, "zombie done")
    # The holder's export goes under its own key and is the one registered.
    by_holder = export(2, "holder")
    assert by_holder != by_zombie and served(by_holder) == "holder"
    model = dataclasses.replace(store.model(job.model_id), state=st.MODEL_READY)
    model.path = by_holder
    store.finish(job.id, 2, "holder", st.SUCCEEDED, "done", model=model)
    artifacts.remove_other_exports(job.model_id, keep=by_holder)
    assert artifacts.objects.open_manifest(by_zombie) is None
    # A zombie that exports after the model is READY never touches the registered files.
    late = export(1, "zombie again")
    assert late != by_holder and served(by_holder) == "holder"
    assert store.model(job.model_id).path == by_holder
    assert store.job(job.id).state == st.SUCCEEDED


def test_an_export_cut_short_is_never_served_and_is_swept(tmp_path):
    from lmforge_server.objectstore import MANIFEST_NAME

    artifacts = _local_artifacts(tmp_path)
    staged = tmp_path / "export"
    staged.mkdir()
    (staged / "model.onnx").write_text("whole")
    key = artifacts.put_model("mdl_x", 1, staged)
    # A writer killed after its files but before its manifest: only the manifest is missing.
    (tmp_path / "store" / key / MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError):
        _local_artifacts(tmp_path).local_dir(key)
    [left] = artifacts.objects.list(key)
    version = left.key.split("/")[3]
    assert artifacts.objects.sweep(older_than_s=0) == [f"{key}/{version}"]
    assert artifacts.objects.list(key) == []


@pytest.mark.slow
@pytest.mark.fault
def test_progress_during_a_redis_outage_is_kept_and_written_when_it_is_back(tmp_path):
    settings = make_settings(tmp_path, lease_ttl_s=15.0)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS.encode())
        job = api.create(ds.id, max_steps=300, log_interval=1, checkpoint_interval=10_000)
        api.wait_for(job.id, lambda j: j.progress.step >= 20)
        time.sleep(1.2)  # AOF is fsynced every second
        stack.redis.stop()  # graceful: the AOF is complete
        time.sleep(2.0)  # the worker trains on; its progress has nowhere to go
        stack.redis.start()  # same port, same directory
        done = api.wait_terminal(job.id, timeout=300)
        assert done.state == S.JOB_STATE_SUCCEEDED and done.attempt == 1, done.error
        events = api.events(job.id)
        steps = [e.progress.step for e in events if e.type == S.JOB_EVENT_TYPE_PROGRESS]
        first = steps[0]
        # Exactly one event per step: none lost in the outage, none written twice (a write
        # whose reply was lost as Redis went down is numbered and not written again), in order.
        assert steps == list(range(first, 301)), [
            (a, b) for a, b in zip(steps, steps[1:], strict=False) if b != a + 1
        ][:5]
        times = [e.time.ToNanoseconds() for e in events if e.type == S.JOB_EVENT_TYPE_PROGRESS]
        assert times == sorted(times)  # kept events carry the time they happened
        worker_log = next(c for c in stack.children if c.role == "worker").log_tail(200_000)
        assert "Redis unreachable" in worker_log and "keeping progress" in worker_log


class _ReplyDropper:
    """A loopback TCP proxy to Redis that, once armed, lets the next transaction (MULTI ...
    EXEC) reach Redis and commit, then cuts the connection instead of passing its reply on:
    the write happened, the writer never heard so."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.armed = threading.Event()
        self.dropped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            exec_sent = threading.Event()
            threading.Thread(
                target=self._up, args=(client, upstream, exec_sent), daemon=True
            ).start()
            threading.Thread(
                target=self._down, args=(client, upstream, exec_sent), daemon=True
            ).start()

    def _up(self, client, upstream, exec_sent) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self.armed.is_set() and b"EXEC" in data:
                    exec_sent.set()
                upstream.sendall(data)

    def _down(self, client, upstream, exec_sent) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if exec_sent.is_set() and self.armed.is_set():
                    self.armed.clear()
                    self.dropped.set()
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    upstream.close()
                    return
                client.sendall(data)


def test_a_progress_event_whose_reply_was_lost_is_written_exactly_once(redis_server, tmp_path):
    proxy = _ReplyDropper(redis_server.port)
    store = st.Store.from_url(f"redis://127.0.0.1:{proxy.port}/0")
    ds = st.DatasetRecord("d" * 64, "default", "d", "d" * 64, 1, 1, 1, 0.0, "/nowhere")
    store.put_dataset(ds)
    job = store.acquire(_job(store, ds).id, "w1", ttl_s=60, device="cpu")
    beat = runner._Heartbeat(store, job.id, job.attempt, "w1", ttl_s=60)  # never started
    hooks = runner._Hooks(store, job, "w1", beat, _local_artifacts(tmp_path))
    hooks.on_progress({"step": 1})
    proxy.armed.set()
    hooks.on_progress({"step": 2})  # committed in Redis; the reply is lost on the way back
    assert proxy.dropped.is_set()
    hooks.flush()  # whatever was kept is sent again
    hooks.on_progress({"step": 3})
    assert not hooks.pending
    events = store.r.xrange(f"{st.P}job:{job.id}:events")
    steps = [json.loads(f["progress"])["step"] for _, f in events if f["type"] == "PROGRESS"]
    assert steps == [1, 2, 3]
