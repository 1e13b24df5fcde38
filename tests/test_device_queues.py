"""Device-class queues and multi-device jobs through the service: real Redis, API server and
Celery worker processes, the ranks under torchrun (gloo on CPU)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grpc
import pytest
import redis
from conftest import SMALL_CORPUS, Api, make_settings

from lmforge.v1 import training_pb2
from lmforge_server.stack import Child, Stack

S = training_pb2
TINY_JOB = dict(max_steps=20, batch_size=8, eval_interval=10, log_interval=5)


def _worker(stack: Stack, log_dir: Path, devices: int) -> Child:
    settings = dataclasses.replace(stack.settings, worker_devices=devices)
    child = Child("worker", settings, log_dir).start()
    stack.children.append(child)
    return child


@pytest.mark.slow
def test_a_job_only_goes_to_a_worker_with_its_device_count_and_waits_queued_for_one(tmp_path):
    settings = make_settings(tmp_path, train_queue="cpu")
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS.encode())
        two = api.create(ds.id, devices=2, **TINY_JOB)
        one = api.create(ds.id, **{**TINY_JOB, "max_steps": 100_000})
        # The stack's worker has one device: it takes the later one-device job, never the
        # two-device one, which waits in its own queue rather than vanish.
        running = api.wait_for(one.id, lambda j: j.state == S.JOB_STATE_RUNNING)
        assert running.device == "cpu"
        api.jobs.CancelJob(S.CancelJobRequest(id=one.id), timeout=30)
        assert api.wait_terminal(one.id).state == S.JOB_STATE_CANCELLED
        assert api.get(two.id).state == S.JOB_STATE_QUEUED
        assert redis.Redis.from_url(stack.settings.redis_url).llen("cpu-x2") == 1

        _worker(stack, tmp_path / "logs-x2", devices=2)
        done = api.wait_terminal(two.id)
        assert done.state == S.JOB_STATE_SUCCEEDED and done.device == "2 x cpu", done.error
        events = api.events(two.id)
        assert any("2 ranks" in e.message for e in events if e.type == S.JOB_EVENT_TYPE_LOG)
        steps = [e.progress.step for e in events if e.type == S.JOB_EVENT_TYPE_PROGRESS]
        assert steps == [5, 10, 15, 20]


def _pids_of(needle: str) -> set[int]:
    """Live (not zombie) processes whose command line holds `needle`."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            pids.add(int(proc.name))
    return pids


def _checkpoint_steps(events) -> list[int]:
    return [
        int(e.message.rsplit(" ", 1)[-1]) for e in events if e.type == S.JOB_EVENT_TYPE_CHECKPOINT
    ]


@pytest.mark.fault
def test_a_killed_worker_takes_its_torchrun_ranks_and_the_job_resumes_from_its_checkpoint(
    tmp_path,
):
    settings = make_settings(tmp_path, train_queue="cpu", worker_devices=2)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS.encode())
        # Too many steps to end on their own while the test looks: ranks left alive would
        # still be there after the kill.
        job = api.create(
            ds.id, devices=2, max_steps=100_000, checkpoint_interval=25, eval_interval=100
        )
        api.wait_for(job.id, lambda j: j.progress.step >= 60)
        ranks = _pids_of(f"{job.id}/attempt-1/ranks")
        assert len(ranks) == 3, ranks  # torchrun and its two ranks
        last_checkpoint = max(_checkpoint_steps(api.events_so_far(job.id)))
        assert last_checkpoint >= 25

        next(c for c in stack.children if c.role == "worker").kill()  # SIGKILL
        killed_at = api.get(job.id).progress.step
        deadline = time.monotonic() + 60
        while _pids_of(f"{job.id}/attempt-1/ranks") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _pids_of(f"{job.id}/attempt-1/ranks"), "torchrun outlived its worker"

        _worker(stack, tmp_path / "logs2", devices=2)
        # Past where attempt 1 was killed: attempt 2 has reported progress of its own.
        api.wait_for(job.id, lambda j: j.attempt == 2 and j.progress.step > killed_at)
        # Every rank of the new attempt honours a cancel.
        api.jobs.CancelJob(S.CancelJobRequest(id=job.id), timeout=30)
        done = api.wait_terminal(job.id)
        assert done.state == S.JOB_STATE_CANCELLED and done.attempt == 2, done.error
        assert not _pids_of(f"{job.id}/attempt-2/ranks")
        events = api.events(job.id)
        start2 = next(i for i, e in enumerate(events) if e.message.startswith("attempt 2"))
        assert "resuming from" in events[start2].message
        steps2 = [e.progress.step for e in events[start2:] if e.type == S.JOB_EVENT_TYPE_PROGRESS]
        assert steps2[0] > last_checkpoint and steps2 == sorted(steps2)


@pytest.mark.fault
def test_a_worker_shutdown_stops_every_rank_with_a_checkpoint_and_requeues_the_job(tmp_path):
    settings = make_settings(tmp_path, train_queue="cpu", worker_devices=2)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS.encode())
        job = api.create(ds.id, devices=2, max_steps=100_000, checkpoint_interval=100_000)
        api.wait_for(job.id, lambda j: j.progress.step >= 20)
        next(c for c in stack.children if c.role == "worker").stop()  # SIGTERM: warm shutdown
        requeued = api.get(job.id)
        assert requeued.state == S.JOB_STATE_QUEUED, requeued.error
        # The ranks stopped together; rank 0 checkpointed where they stopped.
        shutdown_step = _checkpoint_steps(api.events_so_far(job.id))[-1]
        assert shutdown_step >= 20
        assert not _pids_of(f"{job.id}/attempt-1/ranks")
