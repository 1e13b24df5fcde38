"""The gRPC InferenceService: protobuf in, the engine's plain objects out, and back.

Thin by design: it reads the caller's owner from the API key, turns the request into
SamplingParams, calls the Engine, and maps the engine's errors to gRPC status codes. A
client that cancels, disconnects or passes its deadline cancels the handler's task; the
engine then frees the request's slot at the next decode step.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from lmforge.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from lmforge_server import metrics
from lmforge_server.inference import engine as core
from lmforge_server.inference.sampling import SamplingParams
from lmforge_server.interceptor import caller
from lmforge_server.settings import Settings

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "stop": inference_pb2.FINISH_REASON_STOP,
    "eos": inference_pb2.FINISH_REASON_EOS,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
}
_STATUS = [
    (core.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (core.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (core.ModelNotReady, grpc.StatusCode.FAILED_PRECONDITION),
    (core.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


def sampling_params(s: inference_pb2.SamplingParams) -> SamplingParams:
    """Proto -> SamplingParams; unset fields take the documented defaults (not validated)."""
    return SamplingParams(
        max_new_tokens=s.max_new_tokens if s.HasField("max_new_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        logprobs=s.logprobs,
        n=s.n if s.HasField("n") else 1,
        top_logprobs=s.top_logprobs,
        min_tokens=s.min_tokens,
        stop_token_ids=tuple(s.stop_token_ids),
        logit_bias=tuple(sorted(s.logit_bias.items())),
        include_stop_str_in_output=s.include_stop_str_in_output,
    )


def _top(d: core.Delta) -> list[inference_pb2.TopLogprobs]:
    return [
        inference_pb2.TopLogprobs(token_ids=[t for t, _ in step], logprobs=[x for _, x in step])
        for step in d.top_logprobs
    ]


def _timings(t: core.Timings | None) -> inference_pb2.Timings | None:
    if t is None:
        return None
    return inference_pb2.Timings(
        queue_ms=t.queue_ms,
        time_to_first_token_ms=t.time_to_first_token_ms,
        total_ms=t.total_ms,
        tokens_per_second=t.tokens_per_second,
    )


def _usage(d: core.Delta) -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens)


class InferenceService(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: core.Engine, settings: Settings):
        self.engine = engine
        self.settings = settings

    async def _owner(self, context: grpc.aio.ServicerContext) -> str:
        return caller().tenant  # authenticated (and scope-checked) by the interceptor

    async def _fail(self, context: grpc.aio.ServicerContext, e: Exception) -> None:
        for kind, code in _STATUS:
            if isinstance(e, kind):
                await context.abort(code, str(e))
        # A bug: the interceptor answers INTERNAL with an opaque error id and logs the details.
        raise e

    def _request(self, request: inference_pb2.GenerateRequest) -> dict:
        return dict(
            model=request.model,
            prompt=request.prompt,
            params=sampling_params(request.sampling),
            truncate_prompt=request.truncate_prompt,
            request_id=request.request_id,
            context_shift=request.context_shift,
            variant=request.variant,
        )

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        owner = await self._owner(context)
        stream = self.engine.generate(owner, **self._request(request))
        try:
            async for d in stream:
                msg = inference_pb2.GenerateStreamResponse(
                    text=d.text,
                    token_ids=d.token_ids,
                    logprobs=d.logprobs,
                    model_id=d.model_id,
                    request_id=d.request_id,
                    index=d.index,
                    top_logprobs=_top(d),
                )
                if d.final:
                    msg.final = True
                    msg.finish_reason = FINISH_REASONS[d.finish_reason]
                    msg.usage.CopyFrom(_usage(d))
                    msg.timings.CopyFrom(_timings(d.timings))
                    msg.cached_prompt_tokens = d.cached_prompt_tokens
                    msg.context_shifts = d.context_shifts
                    metrics.observe_generation(d)
                yield msg
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # every failure becomes a status; none reaches the server
            await self._fail(context, e)
        finally:
            # Cancelled or disconnected: closing the generator cancels the request now.
            await stream.aclose()

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        owner = await self._owner(context)
        try:
            samples = await self.engine.complete_samples(owner, **self._request(request))
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # every failure becomes a status; none reaches the server
            await self._fail(context, e)
        for c in samples:
            metrics.observe_generation(c)
        d = samples[0]
        choices = [
            inference_pb2.Choice(
                index=c.index,
                text=c.text,
                token_ids=c.token_ids,
                logprobs=c.logprobs,
                finish_reason=FINISH_REASONS[c.finish_reason],
                top_logprobs=_top(c),
                completion_tokens=c.completion_tokens,
            )
            for c in samples
        ]
        return inference_pb2.GenerateResponse(
            model_id=d.model_id,
            text=d.text,
            token_ids=d.token_ids,
            logprobs=d.logprobs,
            finish_reason=FINISH_REASONS[d.finish_reason],
            usage=common_pb2.Usage(
                prompt_tokens=d.prompt_tokens,
                completion_tokens=sum(c.completion_tokens for c in samples),
            ),
            timings=_timings(d.timings),
            request_id=d.request_id,
            top_logprobs=_top(d),
            choices=choices,
            cached_prompt_tokens=d.cached_prompt_tokens,
            context_shifts=d.context_shifts,
        )

    async def GetModelInfo(
        self, request: inference_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelInfo:
        owner = await self._owner(context)
        try:
            info = await self.engine.model_info(owner, request.model, variant=request.variant)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # every failure becomes a status; none reaches the server
            await self._fail(context, e)
        return inference_pb2.ModelInfo(
            model_id=info.model_id,
            name=info.name,
            version=info.version,
            execution_provider=info.execution_provider,
            dtype=info.dtype,
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            eos_token_id=info.eos_token_id,
            loaded=info.loaded,
            variant=info.variant,
            variants=[_graph_variant(v) for v in info.variants],
            prefill=None if info.prefill is None else _graph_variant(info.prefill),
        )

    async def Abort(
        self, request: inference_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.AbortResponse:
        owner = await self._owner(context)
        try:
            aborted = self.engine.abort(owner, request.request_id)
        except Exception as e:  # every failure becomes a status; none reaches the server
            await self._fail(context, e)
        return inference_pb2.AbortResponse(aborted=aborted)


def _graph_variant(v: dict) -> inference_pb2.GraphVariant:
    return inference_pb2.GraphVariant(
        variant=v["variant"],
        val_loss=v.get("val_loss") or 0.0,
        passes_quality_gate=bool(v.get("passes_quality_gate")),
        decode_ms_per_token=v.get("decode_ms_per_token") or 0.0,
        max_abs_logit_diff=v.get("max_abs_logit_diff") or 0.0,
        bytes=v.get("bytes") or 0,
    )
