"""The API server's /metrics after a worker dies mid-job: the reaper's requeue is counted,
and the job shows up as QUEUED again with a task waiting in the training queue."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from conftest import SMALL_CORPUS, Api, make_settings

from lmforge_server.stack import Stack


def scrape(addr: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return {k: float(v) for k, _, v in (ln.rpartition(" ") for ln in lines if ln[:1] != "#" and ln)}


@pytest.mark.fault
@pytest.mark.slow
def test_reaper_requeue_of_a_killed_workers_job_is_counted(tmp_path):
    # A lease long enough that a loaded machine never loses it before the kill.
    settings = make_settings(tmp_path, api_metrics_addr="127.0.0.1:0", lease_ttl_s=6.0)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        metrics_addr = stack.settings.api_metrics_addr
        ds = api.upload(SMALL_CORPUS[:20_000].encode())
        job = api.create(ds.id, max_steps=100_000)
        api.wait_for(job.id, lambda j: j.progress.step > 0)
        before = scrape(metrics_addr)
        assert before['lmforge_jobs{state="RUNNING"}'] == 1
        next(c for c in stack.children if c.role == "worker").kill()  # SIGKILL
        requeued = 'lmforge_reaper_actions_total{action="requeued"}'
        deadline = time.monotonic() + 60
        # The counter moves just before the task is sent again: wait for both.
        while (after := scrape(metrics_addr)).get(requeued, 0) < 1 or after.get(
            "lmforge_training_queue_length", 0
        ) < 1:
            assert time.monotonic() < deadline, f"the reaper never requeued the job: {after}"
            time.sleep(0.2)
        assert after[requeued] == 1
        assert after['lmforge_jobs{state="QUEUED"}'] == 1
        assert after['lmforge_jobs{state="RUNNING"}'] == 0
        assert after["lmforge_training_queue_length"] == 1  # no worker left to take it
