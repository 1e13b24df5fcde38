"""OpenAI-compatible endpoints: completions (streamed or not), models, chat (a clear 400:
no lmforge model has a chat template), files and the fine-tuning jobs subset.

Shapes follow the OpenAI API reference, so the `openai` package works unchanged. What
OpenAI has no field for goes where the reference allows extensions: lmforge spec fields in
`hyperparameters` (or `metadata`), typed by the proto like `lmforge train --set`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmforge.overrides import OverrideError, parse_overrides
from lmforge.v1 import common_pb2, inference_pb2, training_pb2
from lmforge_server.http import calls
from lmforge_server.http.console import SSE_HEADERS
from lmforge_server.http.errors import HTTPError, json_body, rpc_status
from lmforge_server.http.upstream import UNARY_TIMEOUT_S, metadata
from lmforge_server.specs import PRESETS

FINISH = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_EOS: "stop",
    inference_pb2.FINISH_REASON_CANCELLED: "stop",
}
JOB_STATUS = {
    training_pb2.JOB_STATE_QUEUED: "queued",
    training_pb2.JOB_STATE_RUNNING: "running",
    training_pb2.JOB_STATE_EXPORTING: "running",
    training_pb2.JOB_STATE_CANCELLING: "running",
    training_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    training_pb2.JOB_STATE_FAILED: "failed",
    training_pb2.JOB_STATE_CANCELLED: "cancelled",
    training_pb2.JOB_STATE_PAUSED: "paused",
}
FILE_PREFIX = "file-"
# OpenAI's own hyperparameters, accepted only as "auto" (lmforge trains for max_steps).
OPENAI_AUTO_ONLY = ("n_epochs", "learning_rate_multiplier")


def _number(body: dict, key: str, kind: type, lo=None, hi=None):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HTTPError(400, f"{key}: must be a number, got {value!r}", param=key)
    if kind is int and value != int(value):
        raise HTTPError(400, f"{key}: must be an integer, got {value!r}", param=key)
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise HTTPError(400, f"{key}: must be between {lo} and {hi}, got {value}", param=key)
    return value


def _model_name(m: training_pb2.Model) -> str:
    return f"{m.name}@{m.version}"


def _ts(ts) -> int | None:
    return ts.seconds or None


# ---------------------------------------------------------------- completions


def _generate_request(body: dict) -> tuple[inference_pb2.GenerateRequest, bool, bool]:
    """(request, stream, include_usage) from an OpenAI completions body."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HTTPError(400, "model: required, a model name such as 'shakespeare@1'", param="model")
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise HTTPError(
                400, "prompt: lmforge takes one string prompt per request", param="prompt"
            )
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise HTTPError(400, "prompt: required, a string", param="prompt")
    for key, ok in (("n", 1), ("best_of", 1)):
        if body.get(key) not in (None, ok):
            raise HTTPError(400, f"{key}: only {ok} is supported", param=key)
    if body.get("echo"):
        raise HTTPError(400, "echo: not supported", param="echo")
    if body.get("suffix"):
        raise HTTPError(400, "suffix: not supported (no fill-in-the-middle)", param="suffix")
    s = inference_pb2.SamplingParams()
    if (v := _number(body, "max_tokens", int, 1)) is not None:
        s.max_new_tokens = v
    if (v := _number(body, "temperature", float, 0, 2)) is not None:
        s.temperature = v
    if (v := _number(body, "top_p", float, 0, 1)) is not None:
        s.top_p = v
    if (v := _number(body, "seed", int)) is not None:
        s.seed = v
    if (v := _number(body, "frequency_penalty", float, -2, 2)) not in (None, 0):
        raise HTTPError(400, "frequency_penalty: not supported", param="frequency_penalty")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
            raise HTTPError(400, "stop: a string or a list of strings", param="stop")
        if len(stops) > 4:
            raise HTTPError(400, "stop: at most 4 sequences", param="stop")
        s.stop.extend(stops)
    logprobs = body.get("logprobs")
    if logprobs not in (None, False, 0, 1, True):
        raise HTTPError(
            400, "logprobs: only the chosen token's log-probability (0 or 1)", param="logprobs"
        )
    s.logprobs = logprobs is not None and logprobs is not False
    stream = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    if options and not stream:
        raise HTTPError(
            400, "stream_options: only allowed when stream is true", param="stream_options"
        )
    req = inference_pb2.GenerateRequest(model=model, prompt=prompt, sampling=s)
    return req, stream, bool(options.get("include_usage"))


def _logprobs(ids, lps, texts: list[str]) -> dict:
    return {
        "tokens": texts,
        "token_logprobs": list(lps),
        "top_logprobs": None,
        "text_offset": None,
        "token_ids": list(ids),
    }


def _usage(u: common_pb2.Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


async def completions(request: Request) -> Response:
    req, stream, include_usage = _generate_request(await json_body(request))
    up, md = request.app.state.upstream, metadata(request)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if not stream:
        r = await up.inference.Generate(req, metadata=md)
        choice = {
            "index": 0,
            "text": r.text,
            "finish_reason": FINISH.get(r.finish_reason, "stop"),
            "logprobs": _logprobs(r.token_ids, r.logprobs, []) if req.sampling.logprobs else None,
        }
        return JSONResponse(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": req.model,
                "system_fingerprint": r.model_id,
                "choices": [choice],
                "usage": _usage(r.usage),
            }
        )
    call = up.inference.GenerateStream(req, metadata=md)
    try:
        first = await call.read()  # a refused request is an HTTP error, not a broken stream
    except grpc.aio.AioRpcError:
        call.cancel()
        raise

    def chunk(choices: list, usage=None) -> str:
        data = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": choices,
        }
        if include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        msg = first
        try:
            while msg is not grpc.aio.EOF:
                choice = {
                    "index": 0,
                    "text": msg.text,
                    "finish_reason": FINISH.get(msg.finish_reason) if msg.final else None,
                    "logprobs": _logprobs(msg.token_ids, msg.logprobs, [])
                    if req.sampling.logprobs
                    else None,
                }
                yield chunk([choice])
                if msg.final and include_usage:
                    yield chunk([], _usage(msg.usage))
                msg = await call.read()
        except grpc.aio.AioRpcError as e:
            _, err = rpc_status(e)
            yield f"data: {json.dumps(err)}\n\n"
        finally:
            call.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def chat_completions(request: Request) -> Response:
    body = await json_body(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HTTPError(400, "model: required", param="model")
    # An unknown model is a 404 as for completions; a known one has no chat template.
    up = request.app.state.upstream
    await up.models.GetModel(
        training_pb2.GetModelRequest(id=model), metadata=metadata(request), timeout=UNARY_TIMEOUT_S
    )
    raise HTTPError(
        400,
        f"model {model!r} has no chat template: lmforge models are plain language models; "
        "use /v1/completions with a prompt",
        param="model",
        code="model_not_chat",
    )


# ---------------------------------------------------------------- models


def _model(m: training_pb2.Model) -> dict:
    return {
        "id": _model_name(m),
        "object": "model",
        "created": _ts(m.created_at) or 0,
        "owned_by": m.owner,
    }


async def _ready_models(request: Request) -> list[training_pb2.Model]:
    models = await calls.list_models(request.app.state.upstream, metadata(request))
    return [m for m in models if m.state == training_pb2.MODEL_STATE_READY]


async def list_models(request: Request) -> Response:
    return JSONResponse(
        {"object": "list", "data": [_model(m) for m in await _ready_models(request)]}
    )


async def get_model(request: Request) -> Response:
    up = request.app.state.upstream
    m = await up.models.GetModel(
        training_pb2.GetModelRequest(id=request.path_params["model"]),
        metadata=metadata(request),
        timeout=UNARY_TIMEOUT_S,
    )
    return JSONResponse(_model(m))


# ---------------------------------------------------------------- files


def _file(d: training_pb2.Dataset) -> dict:
    return {
        "id": FILE_PREFIX + d.id,
        "object": "file",
        "bytes": d.size_bytes,
        "created_at": _ts(d.created_at) or 0,
        "filename": d.name,
        "purpose": "fine-tune",
        "status": "processed",
        "status_details": None,
    }


def _dataset_id(file_id: str, param: str = "file_id") -> str:
    if not file_id.startswith(FILE_PREFIX):
        raise HTTPError(404, f"No such File object: {file_id}", param=param)
    return file_id[len(FILE_PREFIX) :]


async def create_file(request: Request) -> Response:
    form = await request.form(max_part_size=request.app.state.max_upload_bytes)
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "fine-tune":
            raise HTTPError(
                400,
                f"purpose: lmforge takes 'fine-tune' files only, got {purpose!r}",
                param="purpose",
            )
        if upload is None or isinstance(upload, str):
            raise HTTPError(400, "file: required, the corpus as a plain text file", param="file")

        async def chunks():
            while chunk := await upload.read(calls.CHUNK_BYTES):
                yield chunk

        f, sha256, size = await calls.spool(chunks(), request.app.state.max_upload_bytes)
        with f:
            ds = await calls.upload_dataset(
                request.app.state.upstream,
                metadata(request),
                _dataset_name(upload.filename or ""),
                f,
                sha256,
                size,
            )
    finally:
        await form.close()
    return JSONResponse(_file(ds))


def _dataset_name(filename: str) -> str:
    """A file name as a dataset name: letters, digits, '.', '_' and '-', at most 64."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in filename.rsplit("/", 1)[-1])
    return name.lstrip("._-")[:64]


async def list_files(request: Request) -> Response:
    items = await calls.list_datasets(request.app.state.upstream, metadata(request))
    return JSONResponse({"object": "list", "data": [_file(d) for d in items], "has_more": False})


async def get_file(request: Request) -> Response:
    up = request.app.state.upstream
    ds = await up.datasets.GetDataset(
        training_pb2.GetDatasetRequest(id=_dataset_id(request.path_params["file_id"])),
        metadata=metadata(request),
        timeout=UNARY_TIMEOUT_S,
    )
    return JSONResponse(_file(ds))


async def delete_file(request: Request) -> Response:
    file_id = request.path_params["file_id"]
    up = request.app.state.upstream
    await up.datasets.DeleteDataset(
        training_pb2.DeleteDatasetRequest(id=_dataset_id(file_id)),
        metadata=metadata(request),
        timeout=UNARY_TIMEOUT_S,
    )
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


# ---------------------------------------------------------------- fine-tuning jobs


def _spec_fields(section: str, values: Any) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, dict):
        raise HTTPError(400, f"{section}: must be an object", param=section)
    pairs = []
    for key, value in values.items():
        if key in OPENAI_AUTO_ONLY:
            if value != "auto":
                raise HTTPError(
                    400,
                    f"{section}.{key}: only 'auto'; set max_steps and learning_rate instead",
                    param=f"{section}.{key}",
                )
            continue
        if key == "batch_size" and value == "auto":
            continue
        pairs.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return pairs


def _job_spec(body: dict) -> tuple[training_pb2.JobSpec, str]:
    """(spec, suffix) from a fine_tuning.jobs.create body. `model` is a preset (train from
    scratch) or a registered lmforge model (start from its weights)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HTTPError(
            400, f"model: required: a preset ({', '.join(PRESETS)}) or a model name", param="model"
        )
    method = body.get("method") or {}
    if method and method.get("type") not in (None, "supervised"):
        raise HTTPError(400, "method.type: only 'supervised'", param="method.type")
    hyper = (method.get("supervised") or {}).get("hyperparameters")
    pairs = _spec_fields("hyperparameters", body.get("hyperparameters"))
    pairs += _spec_fields("method.supervised.hyperparameters", hyper)
    pairs += _spec_fields("metadata", body.get("metadata"))
    try:
        model_fields, training_fields = parse_overrides(pairs)
    except OverrideError as e:
        raise HTTPError(400, f"hyperparameters: {e}", param="hyperparameters") from None
    preset = ""
    if model in PRESETS:
        preset = model
    else:
        training_fields.setdefault("init_from", model)
    spec = training_pb2.JobSpec(
        preset=preset,
        model=common_pb2.ModelSpec(**model_fields),
        training=common_pb2.TrainingSpec(**training_fields),
    )
    suffix = body.get("suffix") or ""
    if not isinstance(suffix, str):
        raise HTTPError(400, "suffix: must be a string", param="suffix")
    return spec, suffix


def _estimated_finish(j: training_pb2.Job) -> int | None:
    """The worker's estimate (from its measured steps) while the job runs."""
    if j.state != training_pb2.JOB_STATE_RUNNING:
        return None
    if j.progress.HasField("estimated_finish"):
        return j.progress.estimated_finish.seconds
    eta = j.progress.eta_seconds
    return int(time.time() + eta) if eta else None


def _job(j: training_pb2.Job) -> dict:
    t = j.spec.training
    done = j.state == training_pb2.JOB_STATE_SUCCEEDED
    error = None
    if j.state == training_pb2.JOB_STATE_FAILED:
        error = {"code": "training_failed", "message": j.error, "param": None}
    return {
        "id": j.id,
        "object": "fine_tuning.job",
        "created_at": _ts(j.created_at) or 0,
        "finished_at": _ts(j.finished_at),
        "model": j.spec.preset or t.init_from,
        "fine_tuned_model": j.model_id if done else None,
        "organization_id": j.owner,
        "status": JOB_STATUS.get(j.state, "queued"),
        "hyperparameters": {
            "batch_size": t.batch_size,
            "learning_rate_multiplier": "auto",
            "n_epochs": "auto",
        },
        "training_file": FILE_PREFIX + j.dataset_id,
        "validation_file": None,
        "result_files": [],
        "trained_tokens": j.progress.tokens_seen or None,
        "error": error,
        "seed": t.seed,
        "estimated_finish": _estimated_finish(j),
        "integrations": [],
        "user_provided_suffix": j.model_name,
        "method": {"type": "supervised"},
        "metadata": None,
        # lmforge's own view of the job, for clients that want more than OpenAI's fields.
        "lmforge": {
            "state": training_pb2.JobState.Name(j.state)[len("JOB_STATE_") :],
            "step": j.progress.step,
            "total_steps": j.progress.total_steps,
            "loss": j.progress.loss,
            "val_loss": j.progress.val_loss,
            "model_id": j.model_id,
            "parameters": j.parameters.total,
        },
    }


async def create_job(request: Request) -> Response:
    body = await json_body(request)
    spec, suffix = _job_spec(body)
    file_id = body.get("training_file")
    if not isinstance(file_id, str) or not file_id:
        raise HTTPError(400, "training_file: required, a file id", param="training_file")
    if body.get("validation_file"):
        raise HTTPError(
            400,
            "validation_file: not supported; lmforge holds out val_fraction of the training file",
            param="validation_file",
        )
    req = training_pb2.CreateJobRequest(
        dataset_id=_dataset_id(file_id, "training_file"),
        spec=spec,
        model_name=suffix,
        request_id=request.headers.get("idempotency-key", "") or uuid.uuid4().hex,
    )
    up = request.app.state.upstream
    job = await up.jobs.CreateJob(req, metadata=metadata(request), timeout=UNARY_TIMEOUT_S)
    return JSONResponse(_job(job))


def _limit(request: Request, default: int = 20) -> int:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise HTTPError(400, f"limit: between 1 and 1000, got {raw!r}", param="limit")
    return int(raw)


def _page(items: list[dict], request: Request) -> dict:
    """OpenAI's cursor pages: `after` an id, `limit` items, `has_more`."""
    after, limit = request.query_params.get("after"), _limit(request)
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


async def list_jobs(request: Request) -> Response:
    jobs = await calls.list_jobs(request.app.state.upstream, metadata(request))
    return JSONResponse(_page([_job(j) for j in jobs], request))


async def get_job(request: Request) -> Response:
    job = await calls.get_job(
        request.app.state.upstream, metadata(request), request.path_params["job_id"]
    )
    return JSONResponse(_job(job))


async def cancel_job(request: Request) -> Response:
    up = request.app.state.upstream
    job = await up.jobs.CancelJob(
        training_pb2.CancelJobRequest(id=request.path_params["job_id"]),
        metadata=metadata(request),
        timeout=UNARY_TIMEOUT_S,
    )
    return JSONResponse(_job(job))


def _event(ev: training_pb2.JobEvent) -> dict:
    p = ev.progress
    kind = training_pb2.JobEventType.Name(ev.type)[len("JOB_EVENT_TYPE_") :]
    metrics = kind in ("PROGRESS", "EVAL")
    message = ev.message or (
        f"Step {p.step}/{p.total_steps}: training loss={p.loss:.4f}"
        if kind == "PROGRESS"
        else f"Job {training_pb2.JobState.Name(ev.state)[len('JOB_STATE_') :].lower()}"
    )
    data = {"step": p.step, "train_loss": p.loss, "total_steps": p.total_steps}
    if kind == "EVAL":
        data["valid_loss"] = p.val_loss
    return {
        "id": ev.id,
        "object": "fine_tuning.job.event",
        "created_at": _ts(ev.time) or 0,
        "level": "error" if ev.state == training_pb2.JOB_STATE_FAILED else "info",
        "message": message,
        "type": "metrics" if metrics else "message",
        "data": data if metrics else None,
    }


async def list_events(request: Request) -> Response:
    """Newest first, as OpenAI lists them."""
    events = await calls.events_so_far(
        request.app.state.upstream, metadata(request), request.path_params["job_id"]
    )
    return JSONResponse(_page([_event(e) for e in reversed(events)], request))


routes = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/files", create_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/fine_tuning/jobs", create_job, methods=["POST"]),
    Route("/v1/fine_tuning/jobs", list_jobs, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/v1/fine_tuning/jobs/{job_id}/events", list_events, methods=["GET"]),
]
