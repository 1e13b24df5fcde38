"""The Celery worker: `lmforge worker` runs one process (solo pool) per GPU on queue `gpu`.

Solo pool on purpose: the task runs in the worker's main process, which never forks after
CUDA is initialised, and a SIGTERM reaches the training loop (it checkpoints and gives the
job back instead of dying mid-step).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading

from celery import Celery, signals

from lmforge_server import metrics
from lmforge_server.artifacts import ArtifactStore
from lmforge_server.settings import Settings
from lmforge_server.store import Store
from lmforge_server.taskqueue import TRAIN_TASK, make_celery, worker_queue
from lmforge_worker import runner

log = logging.getLogger("lmforge.worker")


def build_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    store = Store.from_url(settings.redis_url, retention_s=settings.job_retention_s)
    artifacts = ArtifactStore.from_settings(settings)

    @app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True)
    def train(job_id: str) -> str | None:
        return runner.run_job(settings, store, artifacts, job_id)

    return app


@signals.worker_shutting_down.connect
def _on_shutdown(**_) -> None:
    runner.SHUTDOWN.set()


def _preload() -> None:
    # torch, onnx and onnxscript take seconds to import: do it while Celery connects, so
    # neither the first job's start nor its export waits for them.
    for name in ("lmforge_worker.training", "lmforge_worker.export", "torch.onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except Exception:  # the job that needs it reports the error
            log.exception("preloading %s failed", name)


# libgomp spins about 100,000 times a millisecond (its own estimate; 0.35 s of CPU measured
# here): long enough for every gap between a step's kernels, short enough that an idle
# worker gives its cores back. OMP_WAIT_POLICY=ACTIVE alone spins for ~5 minutes after the
# last kernel, so a worker that had trained kept a core busy while it waited for work.
SPIN_COUNT = 30_000_000


def openmp_env(settings: Settings) -> dict[str, str]:
    """The OpenMP wait policy for torch's CPU threads, as environment variables.

    Spinning is explicit and bounded; never libgomp's default (neither variable set), which
    spins ~3 ms and then sleeps: beside one busy process a step took 657 ms that way,
    against 71 waiting passively and 104 spinning (2 threads, 2 cores).
    """
    if settings.train_spin:
        return {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": str(SPIN_COUNT)}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def run_worker(settings: Settings, *, loglevel: str = "INFO") -> None:
    """Runs a Celery worker on settings.redis_url until SIGINT/SIGTERM (blocks)."""
    if not settings.redis_url:
        raise SystemExit("lmforge worker needs a Redis: --redis-url or LMFORGE_REDIS_URL")
    logging.basicConfig(level=loglevel, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Read by libgomp when torch loads, so before any import of torch.
    for name, value in openmp_env(settings).items():
        os.environ.setdefault(name, value)
    app = build_app(settings)
    metrics.serve_metrics(settings.worker_metrics_addr)
    threading.Thread(target=_preload, name="preload", daemon=True).start()
    app.worker_main(
        [
            "worker",
            "--queues", worker_queue(settings),
            "--pool", "solo",
            "--concurrency", "1",
            "--hostname", f"lmforge-{os.getpid()}@{socket.gethostname()}",
            "--loglevel", loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )  # fmt: skip
