"""The training API server (grpc.aio): datasets, jobs, models, watch.

Servicers are thin: turn the request into plain values, call the core (lmforge_server.jobs,
datasets, basemodels, watch, reaper, store), convert the result back. Authentication,
scopes and exception -> status live once, in lmforge_server.interceptor. Blocking Redis
calls run in a thread pool of their own; WatchJob uses redis.asyncio (no thread per stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import redis.asyncio as aredis
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lmforge.v1 import common_pb2, training_pb2, training_pb2_grpc
from lmforge_server import (
    checkpoints,
    datasets,
    downloads,
    job_metrics,
    jobs,
    metrics,
    pausing,
    reaper,
    specs,
    transport,
    validation,
    watch,
)
from lmforge_server import store as st
from lmforge_server.artifacts import ArtifactStore
from lmforge_server.errors import InvalidArgument
from lmforge_server.interceptor import ServiceInterceptor, caller
from lmforge_server.labels import check_labels
from lmforge_server.lifecycle import run_until_signalled
from lmforge_server.settings import Settings
from lmforge_server.taskqueue import LazyCelery

log = logging.getLogger("lmforge.api")

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
PAGE_TOKEN_RE = re.compile(r"\Ao([0-9]{1,15})\Z")

_STATE = training_pb2.JobState
_EVENT = training_pb2.JobEventType
_MODEL_STATE = training_pb2.ModelState


# ------------------------------------------------------------------ conversion


def _ts(seconds: float) -> Timestamp | None:
    if not seconds:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _state(name: str) -> int:
    return _STATE.Value(f"JOB_STATE_{name}")


def _fill(msg, values: dict[str, Any]):
    """Sets the fields of `msg` that `values` has (unknown keys ignored)."""
    for f in msg.DESCRIPTOR.fields:
        if f.name in values and values[f.name] is not None:
            setattr(msg, f.name, values[f.name])
    return msg


def progress_pb(p: dict[str, Any]) -> training_pb2.Progress:
    msg = _fill(training_pb2.Progress(), {k: v for k, v in p.items() if k != "estimated_finish"})
    if p.get("estimated_finish"):
        msg.estimated_finish.CopyFrom(_ts(p["estimated_finish"]))
    return msg


def _params_pb(p: dict[str, int]) -> common_pb2.ParameterCount:
    return _fill(common_pb2.ParameterCount(), p)


def _spec_pb(spec: dict[str, Any]) -> training_pb2.JobSpec:
    return training_pb2.JobSpec(
        preset=spec.get("preset", ""),
        model=_fill(common_pb2.ModelSpec(), spec.get("model", {})),
        training=_fill(common_pb2.TrainingSpec(), spec.get("training", {})),
    )


def dataset_pb(rec: st.DatasetRecord) -> training_pb2.Dataset:
    return training_pb2.Dataset(
        id=rec.id,
        owner=rec.owner,
        name=rec.name,
        sha256=rec.sha256,
        size_bytes=rec.size_bytes,
        num_chars=rec.num_chars,
        num_distinct_chars=rec.num_distinct_chars,
        created_at=_ts(rec.created_at),
    )


def job_pb(job: st.JobRecord) -> training_pb2.Job:
    return training_pb2.Job(
        id=job.id,
        owner=job.owner,
        dataset_id=job.dataset_id,
        model_name=job.model_name,
        state=_state(job.state),
        spec=_spec_pb(job.spec),
        parameters=_params_pb(job.parameters),
        progress=progress_pb(job.progress),
        error=job.error,
        model_id=job.model_id,
        attempt=job.attempt,
        request_id=job.request_id,
        created_at=_ts(job.created_at),
        started_at=_ts(job.started_at),
        finished_at=_ts(job.finished_at),
        device=job.device,
        metadata=job.metadata,
        validation_dataset_id=job.validation_dataset_id,
        export_of=job.export_of,
    )


def validation_pb(
    dataset_id: str, spec: specs.JobSpec, report: validation.Report
) -> training_pb2.Job:
    """CreateJob's answer with validate_only: a Job without id, carrying the report."""
    return training_pb2.Job(
        dataset_id=dataset_id,
        spec=_spec_pb(spec.to_dict()),
        parameters=_params_pb(jobs.parameter_count(spec).__dict__),
        validation=training_pb2.ValidationReport(**report.__dict__),
    )


def event_pb(ev: st.JobEvent) -> training_pb2.JobEvent:
    return training_pb2.JobEvent(
        id=ev.id,
        job_id=ev.job_id,
        type=_EVENT.Value(f"JOB_EVENT_TYPE_{ev.type}"),
        time=_ts(ev.time),
        state=_state(ev.state),
        progress=progress_pb(ev.progress),
        message=ev.message,
        terminal=ev.terminal,
    )


def model_pb(rec: st.ModelRecord) -> training_pb2.Model:
    m = rec.spec.get("model", {})
    return training_pb2.Model(
        id=rec.id,
        owner=rec.owner,
        name=rec.name,
        version=rec.version,
        job_id=rec.job_id,
        state=_MODEL_STATE.Value(f"MODEL_STATE_{rec.state}"),
        parameters=_params_pb(rec.parameters),
        spec=_fill(common_pb2.ModelSpec(), m),
        tokenizer=m.get("tokenizer", ""),
        context_length=m.get("context_length", 0),
        vocab_size=m.get("vocab_size", 0),
        val_loss=rec.metrics.get("val_loss") or 0.0,
        val_bits_per_byte=rec.metrics.get("val_bits_per_byte") or 0.0,
        onnx_parity_max_abs_diff=rec.metrics.get("onnx_parity_max_abs_diff") or 0.0,
        files=rec.files,
        dataset_sha256=rec.dataset_sha256,
        created_at=_ts(rec.created_at),
    )


def checkpoint_pb(job_id: str, c: checkpoints.Checkpoint) -> training_pb2.Checkpoint:
    return training_pb2.Checkpoint(
        ref=f"{job_id}:{c.step}",
        step=c.step,
        train_loss=c.train_loss,
        val_loss=c.val_loss,
        val_bits_per_byte=c.val_bits_per_byte,
        val_step=c.val_step,
        created_at=_ts(c.created_at),
    )


def _set_fields(msg) -> dict[str, Any]:
    """The fields a request set, as plain Python values."""
    return {f.name: v for f, v in msg.ListFields()}


# ------------------------------------------------------------------ request plumbing


def _page(page_size: int, page_token: str) -> tuple[int, int]:
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size: must be between 0 and {MAX_PAGE_SIZE}, got {page_size}")
    offset = 0
    if page_token:
        m = PAGE_TOKEN_RE.match(page_token)
        if not m:
            raise InvalidArgument("page_token: not a token we issued")
        offset = int(m[1])
    return page_size or DEFAULT_PAGE_SIZE, offset


def _next_token(offset: int | None) -> str:
    return "" if offset is None else f"o{offset}"


class _Base:
    """What every servicer shares: settings, the store and a thread pool for its calls."""

    def __init__(self, settings: Settings, store: st.Store, pool: ThreadPoolExecutor):
        self.settings, self.store, self.pool = settings, store, pool

    @property
    def owner(self) -> str:
        return caller().tenant

    async def call(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))


# ------------------------------------------------------------------ datasets


class DatasetService(_Base, training_pb2_grpc.DatasetServiceServicer):
    def __init__(self, settings, store, pool, artifacts: ArtifactStore):
        super().__init__(settings, store, pool)
        self.artifacts = artifacts

    async def UploadDataset(self, request_iterator, context):
        quota = datasets.Quota(
            self.settings.max_upload_bytes,
            self.settings.max_datasets_per_owner,
            self.settings.max_stored_bytes_per_owner,
        )
        rec = await datasets.ingest(
            self.store, self.artifacts, self.pool, quota, self.owner, request_iterator
        )
        return dataset_pb(rec)

    async def GetDataset(self, request, context):
        dataset_id = datasets.check_dataset_id(request.id)
        return dataset_pb(await self.call(self.store.get_dataset, self.owner, dataset_id))

    async def ListDatasets(self, request, context):
        size, offset = _page(request.page_size, request.page_token)
        recs, nxt = await self.call(self.store.list_datasets, self.owner, offset, size)
        return training_pb2.ListDatasetsResponse(
            datasets=[dataset_pb(r) for r in recs], next_page_token=_next_token(nxt)
        )

    async def DeleteDataset(self, request, context):
        dataset_id = datasets.check_dataset_id(request.id)
        rec = await self.call(self.store.delete_dataset, self.owner, dataset_id)
        # Other owners' copies of the same bytes live under keys of their own.
        await self.call(self.artifacts.remove_dataset, rec.path)
        return training_pb2.DeleteDatasetResponse()


# ------------------------------------------------------------------ jobs


class JobService(_Base, training_pb2_grpc.JobServiceServicer):
    def __init__(self, settings, store, pool, celery, aredis_client: aredis.Redis):
        super().__init__(settings, store, pool)
        self.celery = celery
        self.aredis = aredis_client
        self.watches = watch.WatchLimiter(settings.max_watches_per_owner)

    async def CreateJob(self, request, context):
        req = jobs.CreateRequest(
            dataset_id=request.dataset_id,
            preset=request.spec.preset,
            model=_set_fields(request.spec.model),
            training=_set_fields(request.spec.training),
            model_name=request.model_name,
            request_id=request.request_id,
            metadata=dict(request.metadata),
            validation_dataset_id=request.validation_dataset_id,
        )
        if request.validate_only:
            spec, report = await self.call(
                jobs.validate, self.settings, self.store, self.owner, req
            )
            return validation_pb(req.dataset_id, spec, report)
        job = await self.call(jobs.create, self.settings, self.store, self.celery, self.owner, req)
        return job_pb(job)

    async def GetJob(self, request, context):
        job_id = jobs.check_id("id", request.id)
        return job_pb(await self.call(self.store.get_job, self.owner, job_id))

    async def ListJobs(self, request, context):
        size, offset = _page(request.page_size, request.page_token)
        state = None
        if request.state:
            if request.state not in _STATE.values():
                raise InvalidArgument(f"state: {request.state} is not a JobState")
            state = _STATE.Name(request.state).removeprefix("JOB_STATE_")
        labels = check_labels(dict(request.metadata), "metadata")
        found, nxt = await self.call(self.store.list_jobs, self.owner, offset, size, state, labels)
        return training_pb2.ListJobsResponse(
            jobs=[job_pb(j) for j in found], next_page_token=_next_token(nxt)
        )

    async def CancelJob(self, request, context):
        job_id = jobs.check_id("id", request.id)
        return job_pb(await self.call(self.store.request_cancel, self.owner, job_id))

    async def DeleteJob(self, request, context):
        job_id = jobs.check_id("id", request.id)
        await self.call(self.store.delete_job, self.owner, job_id)
        return training_pb2.DeleteJobResponse()

    async def PauseJob(self, request, context):
        job_id = jobs.check_id("id", request.id)
        return job_pb(await self.call(pausing.request_pause, self.store, self.owner, job_id))

    async def ResumeJob(self, request, context):
        job_id = jobs.check_id("id", request.id)
        job = await self.call(
            pausing.resume_and_enqueue, self.settings, self.store, self.celery, self.owner, job_id
        )
        return job_pb(job)

    async def GetJobMetrics(self, request, context):
        job_id = jobs.check_id("id", request.id)
        rows = await self.call(job_metrics.job_metrics, self.store, self.owner, job_id)
        for row in rows:
            yield _fill(training_pb2.MetricRow(), row)

    async def ListCheckpoints(self, request, context):
        job_id = jobs.check_id("id", request.id)
        kept = await self.call(checkpoints.list_checkpoints, self.store, self.owner, job_id)
        return training_pb2.ListCheckpointsResponse(
            checkpoints=[checkpoint_pb(job_id, c) for c in kept]
        )

    async def ExportCheckpoint(self, request, context):
        r = request
        job = await self.call(
            jobs.export_checkpoint, self.settings, self.store, self.celery, self.owner,
            r.job_id, r.step, r.model_name, r.request_id,
        )  # fmt: skip
        return job_pb(job)

    async def WatchJob(self, request, context):
        job_id = jobs.check_id("id", request.id)
        after = watch.check_event_id(request.after_event_id)
        await self.call(self.store.get_job, self.owner, job_id)
        events = watch.watch(self.watches, self.aredis, self.owner, job_id, after, context)
        async with contextlib.aclosing(events):
            async for ev in events:
                yield event_pb(ev)


# ------------------------------------------------------------------ models


class ModelService(_Base, training_pb2_grpc.ModelServiceServicer):
    def __init__(self, settings, store, pool, artifacts: ArtifactStore):
        super().__init__(settings, store, pool)
        self.artifacts = artifacts

    async def ListModels(self, request, context):
        size, offset = _page(request.page_size, request.page_token)
        jobs.check_name("name", request.name)
        recs, nxt = await self.call(self.store.list_models, self.owner, offset, size, request.name)
        return training_pb2.ListModelsResponse(
            models=[model_pb(r) for r in recs], next_page_token=_next_token(nxt)
        )

    async def GetModel(self, request, context):
        ref = jobs.check_id("id", request.id)
        return model_pb(await self.call(self.store.get_model, self.owner, ref))

    async def DeleteModel(self, request, context):
        ref = jobs.check_id("id", request.id)
        rec = await self.call(self.store.delete_model, self.owner, ref)
        if rec.path:
            await self.call(self.artifacts.remove, rec.path)
        return training_pb2.DeleteModelResponse()

    async def DownloadModel(self, request, context):
        ref = jobs.check_id("id", request.id)
        paths = await self.call(downloads.model_files, self.store, self.artifacts, self.owner, ref)
        chunks = downloads.file_chunks(paths)
        while (chunk := await self.call(next, chunks, None)) is not None:
            yield training_pb2.ModelFileChunk(**chunk)


# ------------------------------------------------------------------ server


SERVICE_NAMES = (
    training_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name,
    training_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    training_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serves the API on settings.api_addr until `stop` is set (or forever)."""
    if not settings.redis_url:
        raise SystemExit("lmforge serve api needs a Redis: --redis-url or LMFORGE_REDIS_URL")
    keyring = transport.keyring_or_exit(settings, settings.api_addr)
    store = st.Store.from_url(settings.redis_url, retention_s=settings.job_retention_s)
    # An open watch holds one connection while it waits: room for every RPC in flight.
    async_redis = aredis.Redis.from_url(
        settings.redis_url, decode_responses=True, max_connections=settings.max_concurrent_rpcs
    )
    artifacts = ArtifactStore.from_settings(settings)
    celery = LazyCelery(settings)
    pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="api-redis")
    server = grpc.aio.server(
        interceptors=[metrics.MetricsInterceptor("api"), ServiceInterceptor(keyring)],
        options=[
            ("grpc.max_receive_message_length", 16 << 20),
            # A port in use is an error, not a port shared with another server.
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    exporter = metrics.serve_metrics(
        settings.api_metrics_addr,
        metrics.JobsCollector(lambda: store.job_counts(settings.train_queue)),
    )
    training_pb2_grpc.add_DatasetServiceServicer_to_server(
        DatasetService(settings, store, pool, artifacts), server
    )
    training_pb2_grpc.add_JobServiceServicer_to_server(
        JobService(settings, store, pool, celery, async_redis), server
    )
    training_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelService(settings, store, pool, artifacts), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    transport.listen(server, settings, settings.api_addr)
    await server.start()
    await asyncio.get_running_loop().run_in_executor(pool, store.r.ping)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reaper_task = asyncio.create_task(reaper.run(settings, store, celery, pool, artifacts))
    log.info("API server listening on %s", settings.api_addr)
    try:
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        reaper_task.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2)
        exporter.close()
        await async_redis.aclose()
        pool.shutdown(wait=False, cancel_futures=True)


def run(settings: Settings) -> None:
    """`lmforge serve api`: serves until SIGINT/SIGTERM, then stops cleanly."""
    run_until_signalled(lambda stop: serve(settings, stop=stop))
