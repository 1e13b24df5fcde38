"""The training API server (grpc.aio): datasets, jobs, models, watch.

Servicers are thin: check the caller and the request, call the store, convert back. Redis
calls run in a thread pool of their own so a slow call never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lmforge.v1 import common_pb2, training_pb2, training_pb2_grpc
from lmforge_server import metrics, specs
from lmforge_server import store as st
from lmforge_server.artifacts import TMP_PREFIX, ArtifactStore
from lmforge_server.auth import AuthError, owner_from_metadata
from lmforge_server.lifecycle import run_until_signalled
from lmforge_server.settings import Settings
from lmforge_server.taskqueue import enqueue_training, make_celery

log = logging.getLogger("lmforge.api")

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
EVENT_ID_RE = re.compile(r"^\d+-\d+$")
MAX_REQUEST_ID = 128

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
        progress=_fill(training_pb2.Progress(), job.progress),
        error=job.error,
        model_id=job.model_id,
        attempt=job.attempt,
        request_id=job.request_id,
        created_at=_ts(job.created_at),
        started_at=_ts(job.started_at),
        finished_at=_ts(job.finished_at),
        device=job.device,
    )


def event_pb(ev: st.JobEvent) -> training_pb2.JobEvent:
    return training_pb2.JobEvent(
        id=ev.id,
        job_id=ev.job_id,
        type=_EVENT.Value(f"JOB_EVENT_TYPE_{ev.type}"),
        time=_ts(ev.time),
        state=_state(ev.state),
        progress=_fill(training_pb2.Progress(), ev.progress),
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


def _set_fields(msg) -> dict[str, Any]:
    """The fields a request set, as plain Python values."""
    return {f.name: v for f, v in msg.ListFields()}


# ------------------------------------------------------------------ request plumbing


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _page(page_size: int, page_token: str) -> tuple[int, int]:
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"page_size: must be between 0 and {MAX_PAGE_SIZE}, got {page_size}",
        )
    offset = 0
    if page_token:
        if not page_token.startswith("o") or not page_token[1:].isdigit():
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token: not a token we issued")
        offset = int(page_token[1:])
    return page_size or DEFAULT_PAGE_SIZE, offset


def _next_token(offset: int | None) -> str:
    return "" if offset is None else f"o{offset}"


def _require_id(request) -> None:
    """Requests that name a record by `id` must name one."""
    if "id" in request.DESCRIPTOR.fields_by_name and not request.id:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "id: required")


def rpc(method: Callable) -> Callable:
    """Runs a unary handler with the caller's owner; maps store errors to gRPC statuses."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            owner = self.owner(context)
            _require_id(request)
            return await method(self, owner, request, context)
        except _Abort as e:
            await context.abort(e.code, e.message)
        except st.NotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
        except st.Conflict as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    return wrapper


class _Base:
    def __init__(self, settings: Settings, store: st.Store, pool: ThreadPoolExecutor):
        self.settings, self.store, self.pool = settings, store, pool

    def owner(self, context) -> str:
        try:
            return owner_from_metadata(context.invocation_metadata(), self.settings.api_keys)
        except AuthError as e:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None

    async def call(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))


# ------------------------------------------------------------------ datasets


class DatasetService(_Base, training_pb2_grpc.DatasetServiceServicer):
    def __init__(self, settings, store, pool, artifacts: ArtifactStore):
        super().__init__(settings, store, pool)
        self.artifacts = artifacts

    async def UploadDataset(self, request_iterator, context):
        try:
            owner = self.owner(context)
            return await self._upload(owner, request_iterator)
        except _Abort as e:
            await context.abort(e.code, e.message)

    async def _upload(self, owner: str, requests) -> training_pb2.Dataset:
        limit = self.settings.max_upload_bytes
        header = None
        sha = hashlib.sha256()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        size = num_chars = 0
        chars: set[str] = set()
        tmp_dir = self.artifacts.path("datasets", owner)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{TMP_PREFIX}{st.new_id('upload')}"
        try:
            with open(tmp, "wb") as f:
                async for req in requests:
                    part = req.WhichOneof("part")
                    if header is None:
                        if part != "header":
                            raise _Abort(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                "header: the first message must be the upload header",
                            )
                        header = req.header
                        self._check_header(header, limit)
                        continue
                    if part != "chunk":
                        raise _Abort(
                            grpc.StatusCode.INVALID_ARGUMENT, "header: sent twice; send it once"
                        )
                    size += len(req.chunk)
                    if size > limit:
                        raise _Abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"chunk: upload exceeds the limit of {limit} bytes",
                        )
                    sha.update(req.chunk)
                    try:
                        text = decoder.decode(req.chunk)
                    except UnicodeDecodeError as e:
                        raise _Abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"chunk: not UTF-8 text (byte {size - len(req.chunk) + e.start})",
                        ) from None
                    num_chars += len(text)
                    chars.update(text)
                    f.write(req.chunk)
            if header is None:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "header: missing")
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "chunk: not UTF-8 text (truncated at the end)"
                ) from None
            if size == 0:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "chunk: the dataset is empty")
            digest = sha.hexdigest()
            if digest != header.sha256:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"sha256: content hashes to {digest}, header says {header.sha256}",
                )
            if header.size_bytes and header.size_bytes != size:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"size_bytes: header says {header.size_bytes}, received {size}",
                )
            final = self.artifacts.dataset_dir(owner, digest) / "data.txt"
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.replace(final)
            rec = st.DatasetRecord(
                id=digest,
                owner=owner,
                name=header.name or digest[:12],
                sha256=digest,
                size_bytes=size,
                num_chars=num_chars,
                num_distinct_chars=len(chars),
                created_at=time.time(),
                path=str(final),
            )
            return dataset_pb(await self.call(self.store.put_dataset, rec))
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @staticmethod
    def _check_header(header, limit: int) -> None:
        if header.name and not NAME_RE.match(header.name):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "name: 1-64 characters of letters, digits, '.', '_' or '-'",
            )
        if not SHA256_RE.match(header.sha256):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, "sha256: must be 64 lowercase hex characters"
            )
        if header.size_bytes < 0:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "size_bytes: must not be negative")
        if header.size_bytes > limit:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"size_bytes: {header.size_bytes} exceeds the limit of {limit} bytes",
            )

    @rpc
    async def GetDataset(self, owner, request, context):
        return dataset_pb(await self.call(self.store.get_dataset, owner, request.id))

    @rpc
    async def ListDatasets(self, owner, request, context):
        size, offset = _page(request.page_size, request.page_token)
        recs, nxt = await self.call(self.store.list_datasets, owner, offset, size)
        return training_pb2.ListDatasetsResponse(
            datasets=[dataset_pb(r) for r in recs], next_page_token=_next_token(nxt)
        )

    @rpc
    async def DeleteDataset(self, owner, request, context):
        rec = await self.call(self.store.delete_dataset, owner, request.id)
        # Other owners' copies of the same bytes live in their own folders.
        await self.call(self.artifacts.remove, Path(rec.path).parent)
        return training_pb2.DeleteDatasetResponse()


# ------------------------------------------------------------------ jobs


class JobService(_Base, training_pb2_grpc.JobServiceServicer):
    def __init__(self, settings, store, pool, celery):
        super().__init__(settings, store, pool)
        self.celery = celery

    @rpc
    async def CreateJob(self, owner, request, context):
        if len(request.request_id) > MAX_REQUEST_ID:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id: at most {MAX_REQUEST_ID} characters",
            )
        if request.model_name and not NAME_RE.match(request.model_name):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "model_name: 1-64 characters of letters, digits, '.', '_' or '-'",
            )
        if not request.dataset_id:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "dataset_id: required")
        try:
            dataset = await self.call(self.store.get_dataset, owner, request.dataset_id)
        except st.NotFound:
            raise _Abort(
                grpc.StatusCode.NOT_FOUND, f"dataset_id: dataset {request.dataset_id!r} not found"
            ) from None
        spec = await self._resolve_spec(owner, request.spec, dataset)
        params = specs.count_parameters(spec.model)
        job = st.JobRecord(
            id=st.new_id("job"),
            owner=owner,
            dataset_id=dataset.id,
            model_name=request.model_name or _default_model_name(dataset.name),
            model_id=st.new_id("mdl"),
            state=st.QUEUED,
            spec=spec.to_dict(),
            parameters=params.__dict__,
            request_id=request.request_id,
            created_at=time.time(),
            dataset_path=dataset.path,
        )
        try:
            job, created = await self.call(
                self.store.create_job, job, max_active=self.settings.max_queued_jobs_per_owner
            )
        except st.Conflict as e:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"jobs: {e}") from None
        if created:
            await self.call(enqueue_training, self.celery, self.settings, job.id)
        return job_pb(job)

    async def _resolve_spec(self, owner, spec_pb, dataset) -> specs.JobSpec:
        model = _set_fields(spec_pb.model)
        training = _set_fields(spec_pb.training)
        base_model = None
        init_from = training.get("init_from", "")
        if init_from:
            base_model, training["init_from"] = await self._init_source(owner, init_from)
        try:
            return specs.resolve(
                spec_pb.preset,
                model,
                training,
                num_distinct_chars=dataset.num_distinct_chars,
                base_model=base_model,
            )
        except specs.SpecError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"spec.{e}") from None

    async def _init_source(self, owner: str, ref: str) -> tuple[specs.ModelConfig, str]:
        """The model config and weights directory that `training.init_from` names."""
        field = "spec.training.init_from"
        if ref.startswith(("/", "file://")):
            path = Path(ref.removeprefix("file://"))
            config = path / "config.json"
            if not config.is_file() or not (path / "tokenizer.json").is_file():
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{field}: {path} is not a Llama directory with config.json and tokenizer.json",
                )
            try:
                cfg = specs.model_config_from_hf(json.loads(config.read_text()))
            except (ValueError, KeyError, TypeError) as e:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {e}") from None
            return cfg, str(path)
        try:
            rec = await self.call(self.store.get_model, owner, ref)
        except st.NotFound:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"{field}: model {ref!r} not found") from None
        if rec.state != st.MODEL_READY:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{field}: model {ref!r} is {rec.state.lower()}, not ready",
            )
        return specs.ModelConfig(**rec.spec["model"]), rec.path

    @rpc
    async def GetJob(self, owner, request, context):
        return job_pb(await self.call(self.store.get_job, owner, request.id))

    @rpc
    async def ListJobs(self, owner, request, context):
        size, offset = _page(request.page_size, request.page_token)
        state = None
        if request.state:
            if request.state not in _STATE.values():
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"state: {request.state} is not a JobState",
                )
            state = _STATE.Name(request.state).removeprefix("JOB_STATE_")
        jobs, nxt = await self.call(self.store.list_jobs, owner, offset, size, state)
        return training_pb2.ListJobsResponse(
            jobs=[job_pb(j) for j in jobs], next_page_token=_next_token(nxt)
        )

    @rpc
    async def CancelJob(self, owner, request, context):
        return job_pb(await self.call(self.store.request_cancel, owner, request.id))

    async def WatchJob(self, request, context):
        try:
            owner = self.owner(context)
            _require_id(request)
            if request.after_event_id and not EVENT_ID_RE.match(request.after_event_id):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "after_event_id: must be an event id such as '1700000000000-0'",
                )
            await self.call(self.store.get_job, owner, request.id)
        except _Abort as e:
            await context.abort(e.code, e.message)
        except st.NotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
        after = request.after_event_id
        while not context.done():
            events = await self.call(self.store.read_events, request.id, after, block_ms=500)
            for ev in events:
                await context.write(event_pb(ev))
                after = ev.id
                if ev.terminal:
                    return


def _default_model_name(dataset_name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(dataset_name).stem).strip("-._")[:64]
    return stem or "model"


# ------------------------------------------------------------------ models


class ModelService(_Base, training_pb2_grpc.ModelServiceServicer):
    def __init__(self, settings, store, pool, artifacts: ArtifactStore):
        super().__init__(settings, store, pool)
        self.artifacts = artifacts

    @rpc
    async def ListModels(self, owner, request, context):
        size, offset = _page(request.page_size, request.page_token)
        recs, nxt = await self.call(self.store.list_models, owner, offset, size, request.name)
        return training_pb2.ListModelsResponse(
            models=[model_pb(r) for r in recs], next_page_token=_next_token(nxt)
        )

    @rpc
    async def GetModel(self, owner, request, context):
        return model_pb(await self.call(self.store.get_model, owner, request.id))

    @rpc
    async def DeleteModel(self, owner, request, context):
        rec = await self.call(self.store.delete_model, owner, request.id)
        if rec.path:
            await self.call(self.artifacts.remove, Path(rec.path))
        return training_pb2.DeleteModelResponse()


# ------------------------------------------------------------------ server


async def _reap_orphans(settings: Settings, store: st.Store, celery, pool) -> None:
    """Requeues jobs whose worker died (lease expired): no job is lost with its worker."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(settings.reaper_interval_s)
        try:
            for job_id in await loop.run_in_executor(pool, store.orphans):
                state = await loop.run_in_executor(pool, store.recover_orphan, job_id)
                if state is not None:
                    metrics.REAPER_ACTIONS.labels(
                        "requeued" if state == st.QUEUED else state.lower()
                    ).inc()
                if state == st.QUEUED:
                    log.warning("job %s: its worker was lost; requeued", job_id)
                    await loop.run_in_executor(pool, enqueue_training, celery, settings, job_id)
        except Exception:
            log.exception("orphan reaper failed; retrying")


SERVICE_NAMES = (
    training_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name,
    training_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    training_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serves the API on settings.api_addr until `stop` is set (or forever)."""
    if not settings.redis_url:
        raise SystemExit("lmforge serve api needs a Redis: --redis-url or LMFORGE_REDIS_URL")
    store = st.Store.from_url(settings.redis_url)
    artifacts = ArtifactStore(settings.artifacts_dir)
    celery = make_celery(settings)
    pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="api-redis")
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 16 << 20),
            # A port in use is an error, not a port shared with another server.
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
        interceptors=[metrics.MetricsInterceptor("api")],
    )
    exporter = metrics.serve_metrics(
        settings.api_metrics_addr,
        metrics.JobsCollector(lambda: store.job_counts(settings.train_queue)),
    )
    training_pb2_grpc.add_DatasetServiceServicer_to_server(
        DatasetService(settings, store, pool, artifacts), server
    )
    training_pb2_grpc.add_JobServiceServicer_to_server(
        JobService(settings, store, pool, celery), server
    )
    training_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelService(settings, store, pool, artifacts), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(settings.api_addr)
    if port == 0:
        raise SystemExit(f"cannot listen on {settings.api_addr}")
    await server.start()
    await asyncio.get_running_loop().run_in_executor(pool, store.r.ping)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reaper = asyncio.create_task(_reap_orphans(settings, store, celery, pool))
    log.info("API server listening on %s", settings.api_addr)
    try:
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        reaper.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2)
        exporter.close()
        pool.shutdown(wait=False, cancel_futures=True)


def run(settings: Settings) -> None:
    """`lmforge serve api`: serves until SIGINT/SIGTERM, then stops cleanly."""
    run_until_signalled(lambda stop: serve(settings, stop=stop))
