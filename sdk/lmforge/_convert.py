"""Protobuf <-> dataclass conversion, shared by the sync and async clients."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from google.protobuf.message import Message

from lmforge import types as t
from lmforge.v1 import common_pb2, inference_pb2, training_pb2

_D = TypeVar("_D")


def ref(obj: Any) -> str:
    """An id from a string or from a result that has one (`Job`, `Dataset`, `Model`)."""
    if isinstance(obj, str):
        if not obj:
            raise ValueError("an id must not be empty")
        return obj
    if isinstance(obj, t.Model | t.Job | t.Dataset):
        return obj.id
    raise TypeError(f"expected an id or a result with .id, got {type(obj).__name__}")


def _time(msg: Message, name: str) -> datetime | None:
    if not msg.HasField(name):
        return None
    return getattr(msg, name).ToDatetime(tzinfo=timezone.utc)


def _f32(value: Any) -> Any:
    """A proto `float` widened to a Python float shows noise digits (0.003000000026077032);
    7 significant digits is what float32 holds."""
    return float(f"{value:.7g}") if isinstance(value, float) else value


def _plain(cls: type[_D], msg: Message) -> _D:
    """A dataclass whose fields are a subset of the message's scalar fields, same names."""
    return cls(**{f.name: _f32(getattr(msg, f.name)) for f in dataclasses.fields(cls)})


def _optional_fields(cls: type[_D], msg: Message) -> _D:
    """ModelSpec/TrainingSpec: proto3 `optional` fields, None where unset."""
    return cls(
        **{
            f.name: _f32(getattr(msg, f.name)) if msg.HasField(f.name) else None
            for f in dataclasses.fields(cls)
        }
    )


def _enum(cls: type[t._StrEnum], pb_enum: Any, prefix: str, value: int) -> Any:
    name = pb_enum.Name(value).removeprefix(prefix) if value in pb_enum.values() else "UNSPECIFIED"
    try:
        return cls[name]
    except KeyError:  # a newer server's value this SDK does not know
        return cls["UNSPECIFIED"]


def job_state(value: int) -> t.JobState:
    return _enum(t.JobState, training_pb2.JobState, "JOB_STATE_", value)


def job_state_to_pb(state: str | t.JobState) -> int:
    name = str(state).upper()
    try:
        return training_pb2.JobState.Value(f"JOB_STATE_{name}")
    except ValueError:
        valid = ", ".join(s.value for s in t.JobState if s is not t.JobState.UNSPECIFIED)
        raise ValueError(f"state must be one of {valid}, got {state!r}") from None


def finish_reason(value: int) -> t.FinishReason:
    return _enum(t.FinishReason, inference_pb2.FinishReason, "FINISH_REASON_", value)


# ---------------------------------------------------------------- specs


def model_spec(msg: common_pb2.ModelSpec) -> t.ModelSpec:
    return _optional_fields(t.ModelSpec, msg)


def training_spec(msg: common_pb2.TrainingSpec) -> t.TrainingSpec:
    return _optional_fields(t.TrainingSpec, msg)


def _spec_to_pb(spec: Any, cls: type[_D], pb_cls: type[Message], what: str) -> Message | None:
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - names)
        if unknown:
            raise ValueError(f"{what}: unknown field(s) {', '.join(unknown)}")
        spec = cls(**spec)
    if not isinstance(spec, cls):
        raise TypeError(f"{what} must be a {cls.__name__} or a dict, got {type(spec).__name__}")
    values = {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}
    return pb_cls(**values)


def job_spec_to_pb(
    preset: str,
    model: t.ModelSpec | Mapping[str, Any] | None,
    training: t.TrainingSpec | Mapping[str, Any] | None,
) -> training_pb2.JobSpec:
    return training_pb2.JobSpec(
        preset=preset or "",
        model=_spec_to_pb(model, t.ModelSpec, common_pb2.ModelSpec, "model"),
        training=_spec_to_pb(training, t.TrainingSpec, common_pb2.TrainingSpec, "training"),
    )


def parameter_count(msg: common_pb2.ParameterCount) -> t.ParameterCount:
    return _plain(t.ParameterCount, msg)


def progress(msg: training_pb2.Progress) -> t.Progress:
    scalars = [f.name for f in dataclasses.fields(t.Progress) if f.name != "estimated_finish"]
    return t.Progress(
        **{name: _f32(getattr(msg, name)) for name in scalars},
        estimated_finish=_time(msg, "estimated_finish"),
    )


# ---------------------------------------------------------------- training API


def dataset(msg: training_pb2.Dataset) -> t.Dataset:
    return t.Dataset(
        id=msg.id,
        owner=msg.owner,
        name=msg.name,
        sha256=msg.sha256,
        size_bytes=msg.size_bytes,
        num_chars=msg.num_chars,
        num_distinct_chars=msg.num_distinct_chars,
        created_at=_time(msg, "created_at"),
    )


def job(msg: training_pb2.Job) -> t.Job:
    return t.Job(
        id=msg.id,
        state=job_state(msg.state),
        owner=msg.owner,
        dataset_id=msg.dataset_id,
        model_name=msg.model_name,
        spec=t.JobSpec(
            preset=msg.spec.preset,
            model=model_spec(msg.spec.model),
            training=training_spec(msg.spec.training),
        ),
        parameters=parameter_count(msg.parameters),
        progress=progress(msg.progress),
        error=msg.error,
        model_id=msg.model_id,
        attempt=msg.attempt,
        request_id=msg.request_id,
        created_at=_time(msg, "created_at"),
        started_at=_time(msg, "started_at"),
        finished_at=_time(msg, "finished_at"),
        device=msg.device,
        metadata=dict(msg.metadata),
        validation_dataset_id=msg.validation_dataset_id,
        export_of=msg.export_of,
    )


def checkpoint(msg: training_pb2.Checkpoint) -> t.Checkpoint:
    return t.Checkpoint(
        ref=msg.ref,
        step=msg.step,
        train_loss=_f32(msg.train_loss),
        val_loss=_f32(msg.val_loss),
        val_bits_per_byte=_f32(msg.val_bits_per_byte),
        val_step=msg.val_step,
        created_at=_time(msg, "created_at"),
    )


def validation_report(msg: training_pb2.Job) -> t.ValidationReport:
    """CreateJob's answer with validate_only."""
    r = msg.validation
    skip = {"estimated_seconds", "problems", "spec", "parameters"}
    return t.ValidationReport(
        **{
            f.name: _f32(getattr(r, f.name))
            for f in dataclasses.fields(t.ValidationReport)
            if f.name not in skip
        },
        estimated_seconds={k: _f32(v) for k, v in r.estimated_seconds.items()},
        problems=list(r.problems),
        spec=job(msg).spec,
        parameters=parameter_count(msg.parameters),
    )


def create_job_request(
    dataset, preset, model, training, model_name, request_id, metadata, validation_dataset
) -> training_pb2.CreateJobRequest:
    """jobs.create / jobs.validate (sync and async alike)."""
    return training_pb2.CreateJobRequest(
        dataset_id=ref(dataset),
        spec=job_spec_to_pb(preset, model, training),
        model_name=model_name,
        request_id=request_id or uuid.uuid4().hex,
        metadata=metadata or {},
        validation_dataset_id=ref(validation_dataset) if validation_dataset else "",
    )


def metric_row(msg: training_pb2.MetricRow) -> t.MetricRow:
    return t.MetricRow(
        **{
            f.name: _f32(getattr(msg, f.name))
            if not f.name.startswith("val_") or msg.HasField(f.name)
            else None
            for f in dataclasses.fields(t.MetricRow)
        }
    )


def job_event(msg: training_pb2.JobEvent) -> t.JobEvent:
    return t.JobEvent(
        id=msg.id,
        job_id=msg.job_id,
        type=_enum(t.JobEventType, training_pb2.JobEventType, "JOB_EVENT_TYPE_", msg.type),
        state=job_state(msg.state),
        time=_time(msg, "time"),
        progress=progress(msg.progress),
        message=msg.message,
        terminal=msg.terminal,
    )


def model(msg: training_pb2.Model) -> t.Model:
    return t.Model(
        id=msg.id,
        name=msg.name,
        version=msg.version,
        owner=msg.owner,
        job_id=msg.job_id,
        state=_enum(t.ModelState, training_pb2.ModelState, "MODEL_STATE_", msg.state),
        parameters=parameter_count(msg.parameters),
        spec=model_spec(msg.spec),
        tokenizer=msg.tokenizer,
        context_length=msg.context_length,
        vocab_size=msg.vocab_size,
        val_loss=_f32(msg.val_loss),
        val_bits_per_byte=_f32(msg.val_bits_per_byte),
        onnx_parity_max_abs_diff=_f32(msg.onnx_parity_max_abs_diff),
        files=list(msg.files),
        dataset_sha256=msg.dataset_sha256,
        created_at=_time(msg, "created_at"),
    )


# ---------------------------------------------------------------- inference

SAMPLING_NAMES = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
    "stop",
    "logprobs",
)


def generate_request(
    model: Any,
    prompt: str,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    logprobs: bool = False,
    truncate_prompt: bool = False,
    n: int | None = None,
    request_id: str = "",
    context_shift: bool = False,
    variant: str = "",
) -> inference_pb2.GenerateRequest:
    """The request for `generate`/`stream`; None leaves a sampling parameter to the server."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if isinstance(stop, str):
        stop = [stop]
    sampling = inference_pb2.SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=list(stop or ()),
        logprobs=logprobs,
        n=n,
    )
    return inference_pb2.GenerateRequest(
        model=ref(model),
        prompt=prompt,
        sampling=sampling,
        truncate_prompt=truncate_prompt,
        request_id=request_id,
        context_shift=context_shift,
        variant=variant,
    )


def abort_request(request_id: str) -> inference_pb2.AbortRequest:
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("request_id must be a non-empty str (the one the request was sent with)")
    return inference_pb2.AbortRequest(request_id=request_id)


def _usage(msg: common_pb2.Usage) -> t.Usage:
    return _plain(t.Usage, msg)


def _timings(msg: inference_pb2.Timings) -> t.Timings:
    return _plain(t.Timings, msg)


def completion(msg: inference_pb2.GenerateResponse) -> t.Completion:
    return t.Completion(
        model_id=msg.model_id,
        text=msg.text,
        token_ids=list(msg.token_ids),
        logprobs=[_f32(x) for x in msg.logprobs],
        finish_reason=finish_reason(msg.finish_reason),
        usage=_usage(msg.usage),
        timings=_timings(msg.timings),
        request_id=msg.request_id,
        choices=[
            t.Choice(
                index=c.index,
                text=c.text,
                token_ids=list(c.token_ids),
                logprobs=[_f32(x) for x in c.logprobs],
                finish_reason=finish_reason(c.finish_reason),
                completion_tokens=c.completion_tokens,
            )
            for c in msg.choices
        ],
        cached_prompt_tokens=msg.cached_prompt_tokens,
        context_shifts=msg.context_shifts,
    )


def completion_chunk(msg: inference_pb2.GenerateStreamResponse) -> t.CompletionChunk:
    return t.CompletionChunk(
        text=msg.text,
        token_ids=list(msg.token_ids),
        logprobs=[_f32(x) for x in msg.logprobs],
        final=msg.final,
        finish_reason=finish_reason(msg.finish_reason) if msg.final else None,
        usage=_usage(msg.usage) if msg.final else None,
        timings=_timings(msg.timings) if msg.final else None,
        model_id=msg.model_id,
        request_id=msg.request_id,
        index=msg.index,
        context_shifts=msg.context_shifts,
    )


def model_info(msg: inference_pb2.ModelInfo) -> t.ModelInfo:
    return _plain(t.ModelInfo, msg)


def page(items: list[Any], next_page_token: str) -> t.Page:
    return t.Page(items=items, next_page_token=next_page_token)
