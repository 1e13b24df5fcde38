"""The Celery app on Redis, configured once for both sides: the API server sends
`lmforge.train` tasks, the workers (lmforge_worker.app) run them."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from lmforge_server.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

TRAIN_TASK = "lmforge.train"


def make_celery(settings: Settings) -> Celery:
    from celery import Celery

    app = Celery("lmforge", broker=settings.redis_url, set_as_current=False)
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        # At-least-once: a task is acked after it ran, and redelivered if its worker died;
        # the job's lease (not Celery) keeps two workers off one job.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_routes={TRAIN_TASK: {"queue": settings.train_queue}},
        task_default_queue=settings.train_queue,
        task_ignore_result=True,
        result_backend=None,
        broker_transport_options=transport,
        visibility_timeout=settings.visibility_timeout_s,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


class LazyCelery:
    """make_celery(settings) for a sender, made when it sends its first task: importing
    Celery was a third of every API server's start, and many never send one."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()

    def send_task(self, *args, **kwargs):
        with self._lock:
            if self._app is None:
                self._app = make_celery(self._settings)
        return self._app.send_task(*args, **kwargs)


def queue_for(device_class: str, devices: int) -> str:
    """The Celery queue of a job on `devices` devices of a class: "gpu", "gpu-x4", "cpu"."""
    return device_class if devices <= 1 else f"{device_class}-x{devices}"


def worker_queue(settings: Settings) -> str:
    """The one queue a worker with `worker_devices` devices of class `train_queue` reads."""
    return queue_for(settings.train_queue, settings.worker_devices)


def enqueue_training(
    app: Celery | LazyCelery, settings: Settings, job_id: str, devices: int = 1
) -> None:
    """Sends job `job_id` to the queue of workers with exactly `devices` devices."""
    app.send_task(TRAIN_TASK, args=[job_id], queue=queue_for(settings.train_queue, devices))
