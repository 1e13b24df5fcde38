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
from lmforge_server.taskqueue import TRAIN_TASK, make_celery
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


def run_worker(settings: Settings, *, loglevel: str = "INFO") -> None:
    """Runs a Celery worker on settings.redis_url until SIGINT/SIGTERM (blocks)."""
    if not settings.redis_url:
        raise SystemExit("lmforge worker needs a Redis: --redis-url or LMFORGE_REDIS_URL")
    logging.basicConfig(level=loglevel, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Read by libgomp when torch loads, so before any import of torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE" if settings.train_spin else "PASSIVE")
    app = build_app(settings)
    metrics.serve_metrics(settings.worker_metrics_addr)
    threading.Thread(target=_preload, name="preload", daemon=True).start()
    app.worker_main(
        [
            "worker",
            "--queues", settings.train_queue,
            "--pool", "solo",
            "--concurrency", "1",
            "--hostname", f"lmforge-{os.getpid()}@{socket.gethostname()}",
            "--loglevel", loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )  # fmt: skip
