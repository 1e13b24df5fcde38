"""Running requests straight on a Scheduler (no Engine, no gRPC), for scheduler tests."""

from __future__ import annotations

import threading
import time

from lmforge_server.inference.sampling import SamplingParams
from lmforge_server.inference.scheduler import PrefixCache, Scheduler, make_requests
from lmforge_server.inference.session import OrtModel


class Collector:
    """Deltas of directly submitted requests, gathered on the scheduler thread."""

    def __init__(self):
        self.deltas = []
        self.lock = threading.Lock()

    def __call__(self, d):
        with self.lock:
            self.deltas.append(d)

    def tokens(self):
        with self.lock:
            return [t for d in self.deltas for t in d.token_ids]

    def final(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                done = [d for d in self.deltas if d.final]
            if done:
                return done[-1]
            time.sleep(0.005)
        raise AssertionError("no final delta")


def alone(model: OrtModel, prompt: str, n: int = 12) -> list[int]:
    """Greedy tokens of `prompt` run by itself on a fresh scheduler (no batch, no prefix cache)."""
    sched = Scheduler(model, max_batch_size=1, prefix_cache=PrefixCache(max_bytes=0))
    try:
        out = Collector()
        ids = model.encode(prompt)
        params = SamplingParams(temperature=0)
        sched.submit(make_requests(model, ids, params, out, model_id="m", max_new=n))
        out.final()
        return out.tokens()
    finally:
        sched.close(wait=True)
