"""Fencing: once a job's lease belongs to a newer attempt, the older attempt writes nothing
more (progress, checkpoints, states, the end), in the store and in a real worker."""

from __future__ import annotations

import re
import time

import grpc
import pytest
from conftest import SMALL_CORPUS, Api, make_settings

from lmforge.v1 import training_pb2 as S
from lmforge_server import store as st
from lmforge_server.stack import Stack


def _job(job_id: str) -> st.JobRecord:
    return st.JobRecord(
        id=job_id,
        owner="default",
        dataset_id="d" * 64,
        model_name="fenced",
        model_id=f"mdl_{job_id}",
        state=st.QUEUED,
        spec={},
        parameters={},
        created_at=time.time(),
    )


def _snapshot(store: st.Store, job_id: str):
    return store.r.hgetall(f"{st.P}job:{job_id}"), store.r.xlen(f"{st.P}job:{job_id}:events")


def test_an_attempt_whose_lease_was_taken_over_cannot_write(redis_server):
    store = st.Store.from_url(redis_server.url)
    store.create_job(_job("job_f1"), max_active=10)
    first = store.acquire("job_f1", "worker-a", ttl_s=60, device="cpu")
    assert first.attempt == 1
    store.record_progress("job_f1", 1, "worker-a", {"step": 5})  # the holder may write

    store.r.delete(f"{st.P}lease:job_f1")  # the lease lapses (a worker that stalled)
    second = store.acquire("job_f1", "worker-b", ttl_s=60, device="cpu")
    assert second.attempt == 2
    before = _snapshot(store, "job_f1")
    stale_writes = [
        lambda: store.record_progress("job_f1", 1, "worker-a", {"step": 6}),
        lambda: store.promote_checkpoint("job_f1", 1, "worker-a", "/tmp/ckpt-a.pt", 6),
        lambda: store.set_state("job_f1", 1, "worker-a", st.EXPORTING, "exporting"),
        lambda: store.finish("job_f1", 1, "worker-a", st.FAILED, "boom"),
        lambda: store.requeue("job_f1", 1, "worker-a", "shut down"),
        # The right attempt with another worker's token is not the holder either.
        lambda: store.record_progress("job_f1", 2, "worker-a", {"step": 6}),
    ]
    for write in stale_writes:
        with pytest.raises(st.LeaseLost):
            write()
    assert not store.renew("job_f1", 1, "worker-a", 60)
    store.release("job_f1", 1, "worker-a")  # releasing someone else's lease does nothing
    assert _snapshot(store, "job_f1") == before
    assert store.r.get(f"{st.P}lease:job_f1") == "2:worker-b"
    store.record_progress("job_f1", 2, "worker-b", {"step": 7})
    assert store.job("job_f1").progress["step"] == 7


@pytest.mark.fault
def test_a_cancel_accepted_during_export_wins_over_the_exports_success(redis_server):
    store = st.Store.from_url(redis_server.url)
    store.create_job(_job("job_f3"), max_active=10)
    job = store.acquire("job_f3", "worker-a", ttl_s=60, device="cpu")
    store.set_state("job_f3", job.attempt, "worker-a", st.EXPORTING, "exporting")
    assert store.request_cancel("default", "job_f3").state == st.CANCELLING
    # The export finished after its last look at the cancel flag: the client was told
    # CANCELLING, so the job must not end SUCCEEDED with a READY model.
    model = st.ModelRecord(
        id="mdl_job_f3", owner="default", name="fenced", version=1, job_id="job_f3",
        state=st.MODEL_READY, spec={}, parameters={}, path="models/x", created_at=time.time(),
    )  # fmt: skip
    ended = store.finish("job_f3", job.attempt, "worker-a", st.SUCCEEDED, "ready", model=model)
    assert ended == st.CANCELLED
    assert store.job("job_f3").state == st.CANCELLED
    assert store.r.hget(f"{st.P}model:mdl_job_f3", "state") == st.MODEL_ABANDONED


@pytest.mark.fault  # a second worker takes the lease over; ~5 s end to end
def test_a_worker_whose_lease_was_taken_over_stops_writing(tmp_path):
    settings = make_settings(tmp_path)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS[:20_000].encode())
        job = api.create(ds.id, max_steps=1_000_000, log_interval=1, checkpoint_interval=5)
        api.wait_for(job.id, lambda j: j.progress.step >= 3)
        store = st.Store.from_url(stack.settings.redis_url)
        # What a second worker does once it holds the lease: the next attempt number.
        store.r.set(f"{st.P}lease:{job.id}", "2:thief", px=600_000)
        store.r.hset(f"{st.P}job:{job.id}", "attempt", 2)
        taken = _snapshot(store, job.id)

        worker = next(c for c in stack.children if c.role == "worker")
        deadline = time.monotonic() + 60
        # Proof that the old attempt tried to write after the takeover and was refused, and
        # that its task has returned (Celery logs it as done): once both are in the log, no
        # thread of the worker writes for this job any more, so nothing can land later.
        refused = re.compile(rf"job {job.id}: .* of attempt 1 refused: lease lost")
        done = re.compile(r"Task lmforge\.train\[[^]]+\] succeeded")
        while not (refused.search(log := worker.log_tail(100_000)) and done.search(log)):
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(0.2)
        assert _snapshot(store, job.id) == taken  # not one write since the takeover
        after = api.get(job.id)
        assert after.state == S.JOB_STATE_RUNNING and after.attempt == 2
        assert worker.alive()  # it gave the job up, not its life


def test_checkpoints_are_pruned_only_behind_a_promoted_one(redis_server, tmp_path):
    from lmforge_server.artifacts import ArtifactStore
    from lmforge_server.objectstore import LocalObjectStore
    from lmforge_worker.runner import _Heartbeat, _Hooks

    store = st.Store.from_url(redis_server.url)
    store.create_job(_job("job_f2"), max_active=10)
    job = store.acquire("job_f2", "worker-a", ttl_s=60, device="cpu")
    artifacts = ArtifactStore(
        LocalObjectStore(tmp_path / "store"), tmp_path / "cache", 1 << 30, tmp_path / "tmp"
    )
    beat = _Heartbeat(store, "job_f2", 1, "worker-a", 60)
    hooks = _Hooks(store, job, "worker-a", beat, artifacts)
    hooks.keep_checkpoints = 1  # the newest only (no evaluation ran: no best to keep)
    ckpts = tmp_path / "attempt-1"
    ckpts.mkdir()
    paths = {s: ckpts / f"step-{s:08d}.pt" for s in (10, 20, 30)}
    for s, p in paths.items():
        p.write_bytes(b"checkpoint %d" % s)
    keys = {s: artifacts.checkpoint_key("job_f2", 1, s) for s in paths}

    def stored(step: int) -> bool:
        return artifacts.objects.open_manifest(keys[step]) is not None

    hooks.on_checkpoint(10, paths[10])
    hooks.on_checkpoint(20, paths[20])
    assert store.job("job_f2").checkpoint == keys[20]
    assert artifacts.checkpoint_file(keys[20]).read_bytes() == b"checkpoint 20"
    assert (stored(10), stored(20)) == (False, True)
    assert sorted(p.name for p in ckpts.iterdir()) == [paths[20].name, paths[30].name]

    store.r.delete(f"{st.P}lease:job_f2")  # the lease is gone: step 30 cannot be promoted
    hooks.on_checkpoint(30, paths[30])
    assert hooks.beat.lost.is_set()
    assert store.job("job_f2").checkpoint == keys[20]
    assert stored(20), "the job's resume point was deleted"
    assert paths[20].exists()
