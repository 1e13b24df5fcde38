"""The web console's JSON API (`/api/...`) and its Server-Sent Event streams.

The page is static (static/index.html, app.js); everything it shows comes from here:
gRPC results as JSON with proto field names, job events and generation deltas as SSE.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmforge.v1 import common_pb2, inference_pb2, training_pb2
from lmforge_server.http import calls
from lmforge_server.http.errors import HTTPError, json_body, rpc_status
from lmforge_server.http.upstream import UNARY_TIMEOUT_S, metadata, to_dict

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict, *, event: str | None = None, event_id: str | None = None) -> str:
    """One Server-Sent Event."""
    head = (f"id: {event_id}\n" if event_id else "") + (f"event: {event}\n" if event else "")
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def list_jobs(request: Request) -> Response:
    up, md = request.app.state.upstream, metadata(request)
    state = request.query_params.get("state", "").upper()
    state_pb = 0
    if state:
        names = [n[len("JOB_STATE_") :] for n in training_pb2.JobState.keys()[1:]]
        if state not in names:
            raise HTTPError(400, f"state: must be one of {', '.join(names)}", param="state")
        state_pb = training_pb2.JobState.Value(f"JOB_STATE_{state}")
    jobs = await calls.list_jobs(up, md, state_pb)
    return JSONResponse({"jobs": [to_dict(j) for j in jobs]})


async def get_job(request: Request) -> Response:
    job = await calls.get_job(
        request.app.state.upstream, metadata(request), request.path_params["id"]
    )
    return JSONResponse(to_dict(job))


async def create_job(request: Request) -> Response:
    body = await json_body(request)
    try:
        spec = training_pb2.JobSpec(
            preset=str(body.get("preset", "")),
            model=common_pb2.ModelSpec(**(body.get("model") or {})),
            training=common_pb2.TrainingSpec(**(body.get("training") or {})),
        )
    except (TypeError, ValueError) as e:
        raise HTTPError(400, f"spec: {e}") from None
    req = training_pb2.CreateJobRequest(
        dataset_id=str(body.get("dataset_id", "")),
        spec=spec,
        model_name=str(body.get("model_name", "")),
        request_id=str(body.get("request_id", "")),
    )
    up = request.app.state.upstream
    job = await up.jobs.CreateJob(req, metadata=metadata(request), timeout=UNARY_TIMEOUT_S)
    return JSONResponse(to_dict(job), status_code=201)


async def cancel_job(request: Request) -> Response:
    req = training_pb2.CancelJobRequest(id=request.path_params["id"])
    up = request.app.state.upstream
    job = await up.jobs.CancelJob(req, metadata=metadata(request), timeout=UNARY_TIMEOUT_S)
    return JSONResponse(to_dict(job))


async def watch_job(request: Request) -> Response:
    """WatchJob as SSE: every event from the start (or after `Last-Event-ID`), then live
    ones; an `end` event after the terminal one, an `error` event if the stream fails."""
    up, md = request.app.state.upstream, metadata(request)
    after = request.headers.get("last-event-id") or request.query_params.get("after", "")
    req = training_pb2.WatchJobRequest(id=request.path_params["id"], after_event_id=after)
    call = up.jobs.WatchJob(req, metadata=md)

    async def events() -> AsyncIterator[str]:
        try:
            async for ev in call:
                yield sse(to_dict(ev), event_id=ev.id)
                if ev.terminal:
                    yield sse({}, event="end")
                    return
        except grpc.aio.AioRpcError as e:
            status, body = rpc_status(e)
            yield sse({"status": status, **body}, event="error")
        finally:
            call.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def list_datasets(request: Request) -> Response:
    items = await calls.list_datasets(request.app.state.upstream, metadata(request))
    return JSONResponse({"datasets": [to_dict(d) for d in items]})


async def upload_dataset(request: Request) -> Response:
    """The request body is the corpus itself; `?name=` names it."""
    name = request.query_params.get("name", "")
    f, sha256, size = await calls.spool(request.stream(), request.app.state.max_upload_bytes)
    with f:
        ds = await calls.upload_dataset(
            request.app.state.upstream, metadata(request), name, f, sha256, size
        )
    return JSONResponse(to_dict(ds), status_code=201)


async def list_models(request: Request) -> Response:
    items = await calls.list_models(request.app.state.upstream, metadata(request))
    return JSONResponse({"models": [to_dict(m) for m in items]})


def _sampling(body: dict) -> inference_pb2.SamplingParams:
    s = inference_pb2.SamplingParams()
    fields = {
        "max_tokens": ("max_new_tokens", int),
        "temperature": ("temperature", float),
        "top_k": ("top_k", int),
        "top_p": ("top_p", float),
        "seed": ("seed", int),
    }
    for key, (name, kind) in fields.items():
        value = body.get(key)
        if value is None or value == "":
            continue
        try:
            setattr(s, name, kind(value))
        except (TypeError, ValueError):
            raise HTTPError(400, f"{key}: must be a number, got {value!r}", param=key) from None
    stop = body.get("stop") or []
    s.stop.extend([stop] if isinstance(stop, str) else [str(x) for x in stop])
    return s


async def generate(request: Request) -> Response:
    """The playground: GenerateStream as SSE, one `delta` event per message, then `end`."""
    body = await json_body(request)
    req = inference_pb2.GenerateRequest(
        model=str(body.get("model", "")),
        prompt=str(body.get("prompt", "")),
        sampling=_sampling(body),
    )
    call = request.app.state.upstream.inference.GenerateStream(req, metadata=metadata(request))
    # Fail before the 200 when the request is refused (unknown model, bad value).
    try:
        first = await call.read()
    except grpc.aio.AioRpcError:
        call.cancel()
        raise

    async def deltas() -> AsyncIterator[str]:
        try:
            msg = first
            while msg is not grpc.aio.EOF:
                yield sse(to_dict(msg), event="delta")
                msg = await call.read()
            yield sse({}, event="end")
        except grpc.aio.AioRpcError as e:
            status, err = rpc_status(e)
            yield sse({"status": status, **err}, event="error")
        finally:
            call.cancel()

    return StreamingResponse(deltas(), media_type="text/event-stream", headers=SSE_HEADERS)


routes = [
    Route("/api/jobs", list_jobs, methods=["GET"]),
    Route("/api/jobs", create_job, methods=["POST"]),
    Route("/api/jobs/{id}", get_job, methods=["GET"]),
    Route("/api/jobs/{id}/cancel", cancel_job, methods=["POST"]),
    Route("/api/jobs/{id}/events", watch_job, methods=["GET"]),
    Route("/api/datasets", list_datasets, methods=["GET"]),
    Route("/api/datasets", upload_dataset, methods=["POST"]),
    Route("/api/models", list_models, methods=["GET"]),
    Route("/api/generate", generate, methods=["POST"]),
]
