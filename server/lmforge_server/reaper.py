"""The API server's reaper: no job is lost with its worker, and none loops forever.

Every `reaper_interval_s` it
- requeues RUNNING/EXPORTING jobs whose lease expired (the worker died), or ends them
  FAILED once their worker was lost `max_attempts` times (a poison job: OOM, segfault);
- re-enqueues QUEUED jobs that have no task (the enqueue failed after the job was saved,
  or the worker that received the task died before taking the lease).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

from lmforge_server import jobs, metrics
from lmforge_server import store as st
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


async def run(settings: Settings, store: st.Store, celery, pool: Executor) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(settings.reaper_interval_s)
        try:
            await loop.run_in_executor(pool, sweep, settings, store, celery)
        except Exception:
            log.exception("reaper pass failed; retrying")
