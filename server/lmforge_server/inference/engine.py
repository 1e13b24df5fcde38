"""The request-level inference engine: models loaded on demand, requests checked and streamed.

Knows nothing of gRPC. `Engine.generate` is an async generator of `Delta`s; closing it
(or cancelling the task that iterates it) cancels the request, which frees its batch slot
at the next decode step. `Engine.abort(owner, request_id)` does the same from outside.

Where the rest lives: `session.py` holds the ONNX Runtime session and its KV cache
contract, `scheduler.py` the batching thread (prefill, decode, prefix reuse, context
shift), `sampling.py` and `detokenize.py` the per-request token and text logic.
"""

from __future__ import annotations

import asyncio
import collections
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from lmforge_server.inference.errors import (
    InferenceError,
    InvalidArgument,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
)
from lmforge_server.inference.resolver import ModelResolver, ResolvedModel
from lmforge_server.inference.sampling import SamplingParams
from lmforge_server.inference.scheduler import (
    Delta,
    Request,
    Scheduler,
    Sink,
    Timings,
    make_requests,
)
from lmforge_server.inference.session import (
    CPU_EP,
    CUDA_EP,
    OrtModel,
    choose_providers,
    gpu_present,
    read_variants,
)
from lmforge_server.settings import Settings

__all__ = [
    "CPU_EP",
    "CUDA_EP",
    "DEFAULT_MAX_NEW_TOKENS",
    "Delta",
    "Engine",
    "InferenceError",
    "InvalidArgument",
    "ModelInfo",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "Timings",
    "choose_providers",
    "gpu_present",
]

# max_new_tokens when a request leaves it unset (fewer where the context ends sooner).
DEFAULT_MAX_NEW_TOKENS = 64
MAX_REQUEST_ID_CHARS = 128
# Prompts up to this long are tokenised on the event loop (~0.3 ms at most with a
# byte-level BPE); longer ones in a thread, so a 1 MB prompt never stalls other streams.
INLINE_TOKENIZE_CHARS = 1024


@dataclass
class ModelInfo:
    model_id: str
    name: str
    version: int
    execution_provider: str
    dtype: str
    context_length: int
    vocab_size: int
    eos_token_id: int
    loaded: bool
    # The graph variant served ("fp32", "int8", "int4", "fp16") and every exported one.
    variant: str = "fp32"
    variants: list[dict] = field(default_factory=list)
    # The w8a8 prefill graph's facts when prompts run through it (loaded), else None.
    prefill: dict | None = None


@dataclass
class _Loaded:
    resolved: ResolvedModel
    model: OrtModel
    scheduler: Scheduler


class Engine:
    """Loads models lazily (LRU of settings.max_loaded_models) and streams generations."""

    def __init__(self, settings: Settings, resolver: ModelResolver):
        self.settings = settings
        self.resolver = resolver
        self.providers = choose_providers(settings.inference_device)
        # Keyed by (model id, variant): a request may name a variant other than the default.
        self._loaded: collections.OrderedDict[tuple[str, str], _Loaded] = collections.OrderedDict()
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        # (owner, request_id) -> the samples of a request in flight, for `abort`.
        self._inflight: dict[tuple[str, str], tuple[Scheduler, list[Request]]] = {}

    # -- models

    async def _resolve(self, owner: str, ref: str) -> ResolvedModel:
        if not ref:
            raise InvalidArgument("model", "is required")
        try:
            if getattr(self.resolver, "blocking", True):
                return await asyncio.to_thread(self.resolver.resolve, owner, ref)
            return self.resolver.resolve(owner, ref)
        except KeyError:
            raise ModelNotFound(f"model {ref!r} not found") from None

    async def _get(self, owner: str, ref: str, variant: str = "") -> _Loaded:
        resolved = await self._resolve(owner, ref)
        if resolved.state == "TRAINING":
            raise ModelNotReady(f"model {ref!r} is still training; it serves once its job succeeds")
        if resolved.state != "READY":
            raise ModelNotReady(f"model {ref!r} is {resolved.state.lower()}; it cannot serve")
        loaded = self._loaded.get((resolved.model_id, variant))
        if loaded is not None:  # serving already: its files were checked when it loaded
            self._loaded.move_to_end((resolved.model_id, variant))
            return loaded
        names = [v["variant"] for v in read_variants(resolved.path)]
        if "fp32" not in names:
            # Its files are gone (deleted under a record that still says READY).
            raise ModelNotReady(f"model {ref!r} has no servable files; it cannot serve")
        if variant:
            if variant not in names:
                raise InvalidArgument(
                    "variant", f"{variant!r} is not exported for this model; it has {names}"
                )
        return await self._load(resolved, variant)

    async def _load(self, resolved: ResolvedModel, variant: str) -> _Loaded:
        key = (resolved.model_id, variant)  # not loaded yet (`_get` serves loaded ones)
        if key in self._loading:
            return await asyncio.shield(self._loading[key])
        fut = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            model = await asyncio.to_thread(
                OrtModel,
                resolved.path,
                providers=self.providers,
                spin=self.settings.inference_spin,
                variant=variant,
                threads=self.settings.inference_threads,
                prefill_graph=self.settings.inference_prefill_graph,
            )
            sched = Scheduler(
                model, max_batch_size=self.settings.max_batch_size, name=resolved.model_id
            )
            loaded = _Loaded(resolved, model, sched)
            self._loaded[key] = loaded
            while len(self._loaded) > max(1, self.settings.max_loaded_models):
                _, evicted = self._loaded.popitem(last=False)
                # Streams in flight finish on the old session; then its thread ends.
                evicted.scheduler.close()
            fut.set_result(loaded)
            return loaded
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._loading[key]

    async def model_info(
        self, owner: str, ref: str, *, load: bool = True, variant: str = ""
    ) -> ModelInfo:
        """Facts about a model; loads it first unless `load` is false."""
        if load:
            loaded = await self._get(owner, ref, variant)
        else:
            resolved = await self._resolve(owner, ref)
            loaded = self._loaded.get((resolved.model_id, variant))
            if loaded is None:
                config = json.loads((resolved.path / "config.json").read_text())
                return ModelInfo(
                    resolved.model_id,
                    resolved.name,
                    resolved.version,
                    self.providers[0],
                    "fp32",
                    int(config.get("max_position_embeddings", 0)),
                    int(config.get("vocab_size", 0)),
                    int(config.get("eos_token_id", 0)),
                    loaded=False,
                    variant=variant or "fp32",
                    variants=read_variants(resolved.path),
                )
        m, r = loaded.model, loaded.resolved
        return ModelInfo(
            r.model_id,
            r.name,
            r.version,
            m.provider,
            m.dtype,
            m.context_length,
            m.vocab_size,
            m.eos_token_id,
            loaded=True,
            variant=m.variant,
            variants=m.variants,
            prefill=m.prefill_info,
        )

    # -- generation

    def check_params(self, params: SamplingParams) -> None:
        """Raises InvalidArgument naming the sampling field and its limit."""
        limit = self.settings.max_new_tokens_limit
        if params.max_new_tokens is not None and not 1 <= params.max_new_tokens <= limit:
            raise InvalidArgument(
                "sampling.max_new_tokens",
                f"must be between 1 and {limit}, got {params.max_new_tokens}",
            )
        try:
            params.check()
        except ValueError as e:
            name = str(e).split(" ", 1)[0]
            raise InvalidArgument(f"sampling.{name}", str(e).split(" ", 1)[1]) from None
        if len(params.stop) > 16 or any(len(s) > 256 for s in params.stop):
            raise InvalidArgument("sampling.stop", "at most 16 sequences of 256 characters each")
        if params.n > self.settings.max_batch_size:
            raise InvalidArgument(
                "sampling.n",
                f"must be at most the server's max_batch_size ({self.settings.max_batch_size}), "
                f"got {params.n}",
            )

    def _check_request_id(self, owner: str, request_id: str) -> str:
        if not request_id:
            return uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
            raise InvalidArgument(
                "request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable characters"
            )
        if (owner, request_id) in self._inflight:
            raise InvalidArgument("request_id", f"{request_id!r} is already in flight")
        return request_id

    def _max_new(
        self, params: SamplingParams, prompt_tokens: int, ctx: int, shift: bool, fit: bool
    ) -> int:
        """max_new_tokens for the request: refused past the context unless the request
        shifts it (context_shift) or asked to fit in it (truncate_prompt: capped there)."""
        room = ctx - prompt_tokens
        if params.max_new_tokens is None:
            return min(DEFAULT_MAX_NEW_TOKENS, self.settings.max_new_tokens_limit, room)
        if params.max_new_tokens > room and fit and not shift:
            return room
        if params.max_new_tokens > room and not shift:
            raise InvalidArgument(
                "sampling.max_new_tokens",
                f"is {params.max_new_tokens}, but the prompt's {prompt_tokens} tokens leave "
                f"{room} of the model's context length {ctx} (set context_shift to generate "
                "past the context)",
            )
        return params.max_new_tokens

    async def generate(
        self,
        owner: str,
        model: str,
        prompt: str,
        params: SamplingParams,
        *,
        truncate_prompt: bool = False,
        request_id: str = "",
        context_shift: bool = False,
        variant: str = "",
    ) -> AsyncIterator[Delta]:
        """Streams the generation as deltas of its `n` samples (`Delta.index`); each sample's
        last delta has `final` set, and the stream ends after all of them.

        Raises InvalidArgument, ModelNotFound, ModelNotReady or Overloaded before the first
        delta. Closing the iterator (or cancelling its task) cancels the request.
        """
        self.check_params(params)
        request_id = self._check_request_id(owner, request_id)
        if not prompt:
            raise InvalidArgument("prompt", "must not be empty")
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidArgument(
                "prompt",
                f"is {len(prompt)} characters; the limit is {self.settings.max_prompt_chars}",
            )
        loaded = await self._get(owner, model, variant)
        m, sched = loaded.model, loaded.scheduler
        try:
            params.check_vocab(m.vocab_size)
        except ValueError as e:
            name, why = str(e).split(" ", 1)
            raise InvalidArgument(f"sampling.{name}", why) from None
        # Refuse a full queue before paying for tokenisation (a flood of huge prompts).
        sched.check_capacity()
        ids, missing = await self._tokenize(m, prompt)
        if missing:
            shown = "".join(sorted(missing)[:20])
            raise InvalidArgument(
                "prompt", f"has characters outside this model's vocabulary: {shown!r}"
            )
        ctx = m.context_length
        if len(ids) > ctx - 1 and not truncate_prompt:
            raise InvalidArgument(
                "prompt",
                f"is {len(ids)} tokens; the model's context length is {ctx}, so the limit "
                f"is {ctx - 1} prompt tokens (set truncate_prompt to keep the last ones)",
            )
        ids = ids[-(ctx - 1) :]
        max_new = self._max_new(params, len(ids), ctx, context_shift, truncate_prompt)
        if params.min_tokens > max_new:
            raise InvalidArgument(
                "sampling.min_tokens",
                f"must be at most the tokens this request can generate ({max_new}), "
                f"got {params.min_tokens}",
            )
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        rows = make_requests(
            m,
            ids,
            params,
            Sink(asyncio.get_running_loop(), queue),
            model_id=loaded.resolved.model_id,
            max_new=max_new,
            request_id=request_id,
            context_shift=context_shift,
        )
        key = (owner, request_id)
        if key in self._inflight:  # the same id arrived while this one was tokenising
            raise InvalidArgument("request_id", f"{request_id!r} is already in flight")
        sched.submit(rows)
        self._inflight[key] = (sched, rows)
        try:
            left = params.n
            while left:
                delta = await queue.get()
                if delta.final and delta.finish_reason == "error":
                    raise InferenceError(f"generation failed: {delta.text}")
                yield delta
                left -= delta.final
        finally:
            self._inflight.pop(key, None)
            for req in rows:
                if not req.done:
                    sched.cancel(req)

    @staticmethod
    async def _tokenize(m: OrtModel, prompt: str) -> tuple[list[int], set[str]]:
        """The prompt's ids, and the characters its tokenizer would silently drop (a char
        tokenizer has no unknown token). A long prompt is tokenised off the event loop; a
        short one in place: two thread hand-offs cost ~0.4 ms of a 64-token prompt's time
        to first token, its tokenisation ~20 us."""

        def tokenize() -> tuple[list[int], set[str]]:
            ids = m.encode(prompt)
            return ids, set(prompt) - set(m.decode(ids))

        if len(prompt) <= INLINE_TOKENIZE_CHARS:
            return tokenize()
        return await asyncio.to_thread(tokenize)

    def abort(self, owner: str, request_id: str) -> bool:
        """Cancels the caller's request in flight with this id; False when there is none."""
        if not request_id:
            raise InvalidArgument("request_id", "is required")
        found = self._inflight.get((owner, request_id))
        if found is None:
            return False
        sched, rows = found
        for req in rows:
            sched.cancel(req)
        return True

    async def complete(
        self, owner: str, model: str, prompt: str, params: SamplingParams, **kw
    ) -> Delta:
        """The whole generation of sample 0 as one Delta (text and tokens joined, final
        fields set); `complete_samples` gives all n."""
        return (await self.complete_samples(owner, model, prompt, params, **kw))[0]

    async def complete_samples(
        self, owner: str, model: str, prompt: str, params: SamplingParams, **kw
    ) -> list[Delta]:
        """The whole generation, one Delta per sample (text and tokens joined, final fields set)."""
        parts: dict[int, list[Delta]] = collections.defaultdict(list)
        finals: dict[int, Delta] = {}
        async for d in self.generate(owner, model, prompt, params, **kw):
            parts[d.index].append(d)
            if d.final:
                finals[d.index] = d
        if len(finals) != params.n:
            raise InferenceError("generation ended without a final delta")
        out = []
        for i in range(params.n):
            ds = parts[i]
            out.append(
                replace(
                    finals[i],
                    text="".join(d.text for d in ds),
                    token_ids=[t for d in ds for t in d.token_ids],
                    logprobs=[x for d in ds for x in d.logprobs],
                    top_logprobs=[x for d in ds for x in d.top_logprobs],
                )
            )
        return out

    def stats(self) -> dict[str, dict]:
        """Per loaded model: active batch rows, queued requests, finished ones by reason."""
        return {
            (k[0] if not k[1] else f"{k[0]}:{k[1]}"): {
                "active": v.scheduler.active,
                "queued": v.scheduler.queued,
                "finished": dict(v.scheduler.finished),
                "prefix_hits": v.scheduler.prefixes.hits + v.scheduler.resident_hits,
                "prefix_hits_in_slot": v.scheduler.resident_hits,
                "prefill_calls": v.scheduler.prefill_calls,
                "prefilled_groups": v.scheduler.prefilled_groups,
            }
            for k, v in self._loaded.items()
        }

    async def close(self) -> None:
        """Stops every scheduler; requests in flight end first."""
        loaded = list(self._loaded.values())
        self._loaded.clear()
        for item in loaded:
            item.scheduler.close()
        for item in loaded:
            await asyncio.to_thread(item.scheduler.join)
