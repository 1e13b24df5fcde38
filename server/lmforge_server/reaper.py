"""The API server's reaper: no job is lost with its worker, and none loops forever.

Every `reaper_interval_s` it
- requeues RUNNING/EXPORTING jobs whose lease expired (the worker died), or ends them
  FAILED once their worker was lost `max_attempts` times (a poison job: OOM, segfault);
- re-enqueues QUEUED jobs that have no task (the enqueue failed after the job was saved,
  or the worker that received the task died before taking the lease);

and every tenth of `artifact_tmp_max_age_s` it sweeps the artifact store of objects that
no manifest names and that are older than that (writers killed mid-publish). Every API
server runs it; two passes at once are harmless (each only removes unpublished objects).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor

from lmforge_server import jobs, metrics
from lmforge_server import store as st
from lmforge_server.artifacts import ArtifactStore
from lmforge_server.settings import Settings

log = logging.getLogger("lmforge.reaper")


def sweep(settings: Settings, store: st.Store, celery) -> None:
    """One pass of the reaper (blocking; Redis calls)."""
    for job_id in store.orphans():
        state = store.recover_orphan(job_id, settings.max_attempts)
        if state is not None:
            metrics.REAPER_ACTIONS.labels("requeued" if state == st.QUEUED else state.lower()).inc()
        if state == st.QUEUED:
            log.warning("job %s: its worker was lost; requeued", job_id)
            jobs.enqueue(celery, settings, store, job_id)
        elif state == st.FAILED:
            log.error("job %s: worker lost %s times; failed", job_id, settings.max_attempts)
    for job_id in store.stalled_queued(settings.requeue_stalled_after_s):
        log.warning("job %s: queued without a task; enqueueing it again", job_id)
        metrics.REAPER_ACTIONS.labels("reenqueued").inc()
        jobs.enqueue(celery, settings, store, job_id)


def sweep_artifacts(settings: Settings, artifacts: ArtifactStore) -> None:
    removed = artifacts.objects.sweep(settings.artifact_tmp_max_age_s)
    if removed:
        log.warning("swept %d unpublished artifact objects (killed writers)", len(removed))


async def run(
    settings: Settings, store: st.Store, celery, pool: Executor, artifacts: ArtifactStore
) -> None:
    loop = asyncio.get_running_loop()
    sweep_every = max(settings.reaper_interval_s, settings.artifact_tmp_max_age_s / 10)
    next_artifact_sweep = time.monotonic()
    while True:
        await asyncio.sleep(settings.reaper_interval_s)
        try:
            await loop.run_in_executor(pool, sweep, settings, store, celery)
            if time.monotonic() >= next_artifact_sweep:
                next_artifact_sweep = time.monotonic() + sweep_every
                await loop.run_in_executor(pool, sweep_artifacts, settings, artifacts)
        except Exception:
            log.exception("reaper pass failed; retrying")
