"""Pause and resume: a paused job keeps its checkpoint and holds no worker.

PauseJob on a QUEUED job pauses it at once (a task still in the queue skips it); on a
RUNNING job it sets a flag that the worker's heartbeat sees: the loop checkpoints, the
worker records PAUSED and lets the job go. ResumeJob puts a PAUSED job back in the queue;
the worker that takes it continues from the checkpoint, bit for bit on CPU.
"""

from __future__ import annotations

import redis

from lmforge_server import store as st

PAUSED = st.PAUSED
# Pausable now; RUNNING only until its export starts.
_PAUSABLE = (st.QUEUED, st.RUNNING)


def request_pause(store: st.Store, owner: str, job_id: str) -> st.JobRecord:
    """QUEUED becomes PAUSED at once; RUNNING asks its worker to pause at the next step.

    Pausing a PAUSED job returns it unchanged. Raises Conflict for a job that is
    exporting, cancelling or finished, NotFound for another owner's job.
    """
    key = f"{st.P}job:{job_id}"
    with store.r.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                job = store.get_job(owner, job_id)
                if job.state == PAUSED:
                    pipe.unwatch()
                    return job
                if job.export_of:
                    pipe.unwatch()
                    raise st.Conflict(
                        f"job {job_id!r} exports a checkpoint; it cannot be paused (cancel it)"
                    )
                if job.state not in _PAUSABLE:
                    pipe.unwatch()
                    raise st.Conflict(
                        f"job {job_id!r} is {job.state.lower()}; only queued or running jobs "
                        "can be paused"
                    )
                pipe.multi()
                if job.state == st.QUEUED:
                    pipe.hset(key, mapping={"state": PAUSED, "pause_requested": "0"})
                    store._event_cmd(pipe, job_id, "STATE", PAUSED, "paused while queued")
                else:
                    pipe.hset(key, "pause_requested", "1")
                    store._event_cmd(pipe, job_id, "LOG", job.state, "pause requested")
                pipe.execute()
                return store.job(job_id)
            except redis.WatchError:
                continue


def resume(store: st.Store, owner: str, job_id: str) -> tuple[st.JobRecord, bool]:
    """PAUSED becomes QUEUED; returns (job, True) when the caller must enqueue its task.

    On a QUEUED or RUNNING job it withdraws a pause request not yet acted on and returns
    (job, False). Raises Conflict for a job that is exporting, cancelling or finished.
    """
    key = f"{st.P}job:{job_id}"
    with store.r.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                job = store.get_job(owner, job_id)
                if job.state not in (PAUSED, *_PAUSABLE):
                    pipe.unwatch()
                    raise st.Conflict(
                        f"job {job_id!r} is {job.state.lower()}; only paused jobs can be resumed"
                    )
                pipe.multi()
                pipe.hset(key, "pause_requested", "0")
                if job.state == PAUSED:
                    pipe.hset(key, "state", st.QUEUED)
                    at = f" from {job.checkpoint}" if job.checkpoint else ""
                    store._event_cmd(pipe, job_id, "STATE", st.QUEUED, f"resumed{at}")
                pipe.execute()
                return store.job(job_id), job.state == PAUSED
            except redis.WatchError:
                continue


def resume_and_enqueue(settings, store: st.Store, celery, owner: str, job_id: str) -> st.JobRecord:
    """ResumeJob: `resume`, then hands a requeued job to Celery (recorded for the reaper)."""
    from lmforge_server.jobs import enqueue

    job, requeue = resume(store, owner, job_id)
    if requeue:
        enqueue(celery, settings, store, job.id)
    return job


def pause_requested(store: st.Store, job_id: str) -> bool:
    return store.r.hget(f"{st.P}job:{job_id}", "pause_requested") == "1"


def mark_paused(store: st.Store, job_id: str, attempt: int, token: str, step: int) -> None:
    """The lease holder, having checkpointed, records PAUSED and gives the lease back."""

    def write(pipe, job):
        pipe.delete(f"{st.P}lease:{job_id}")
        if job.cancel_requested:  # a cancel that arrived meanwhile wins
            store._finish_cmd(pipe, job, st.CANCELLED, f"cancelled at step {step}")
            return
        pipe.hset(f"{st.P}job:{job_id}", mapping={"state": PAUSED, "pause_requested": "0"})
        store._event_cmd(pipe, job_id, "STATE", PAUSED, f"paused at step {step}", job.progress)

    store.fenced(job_id, attempt, token, write)
