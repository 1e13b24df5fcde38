"""The inference core: ONNX Runtime sessions, a batching scheduler, streaming generation.

Knows nothing of gRPC. `Engine.generate` is an async generator of `Delta`s; closing it
(or cancelling the task that iterates it) cancels the request, which frees its batch slot
at the next decode step.

Per loaded model one scheduler thread runs ONNX Runtime (off the asyncio event loop): it
prefills each new request alone (batch 1, no padding), then runs the decode steps of all
active requests as one batch. Rows are left-padded to the longest cache and masked with
`attention_mask`; padding is added only when a request joins and trimmed when the
longest one leaves, so a steady batch runs without copies. Batched against one by one
(bench/bench_inference.py: 10.7M-parameter model, 2 CPU cores, 64-token prompts, 128
tokens each): 1244 vs 575 tokens/s at 4 streams, 2381 vs 583 at 16; so decode steps are
always batched, up to settings.max_batch_size rows. A step's deltas reach the event loop
in one hand-over (one wake-up, not one per row).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge_server.inference.detokenize import IncrementalDetokenizer
from lmforge_server.inference.resolver import ModelResolver, ResolvedModel
from lmforge_server.inference.sampling import Sampler, SamplingParams
from lmforge_server.settings import Settings
from lmforge_server.specs import EOS_TOKEN

log = logging.getLogger(__name__)

CPU_EP, CUDA_EP = "CPUExecutionProvider", "CUDAExecutionProvider"
# Requests waiting for a batch slot, per model, beyond which new ones are refused.
QUEUE_PER_SLOT = 16


# --- errors (the servicer maps each to a gRPC status) ---------------------------------------


class InferenceError(Exception):
    """Base of the errors a request can get."""


class InvalidArgument(InferenceError):
    """A request field is out of range; `field` names it (INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFound(InferenceError):
    """No such model for this owner (NOT_FOUND)."""


class ModelNotReady(InferenceError):
    """The model exists but cannot serve: still training, or abandoned (FAILED_PRECONDITION)."""


class Overloaded(InferenceError):
    """The model's queue is full (RESOURCE_EXHAUSTED)."""


# --- results ----------------------------------------------------------------------------------


@dataclass
class Timings:
    queue_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class Delta:
    """One streamed piece: text since the previous delta and the tokens behind it."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    model_id: str
    final: bool = False
    # Set on the final delta: "length", "stop", "eos" or "cancelled".
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings | None = None


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


# --- device choice ----------------------------------------------------------------------------


def gpu_present() -> bool:
    """An NVIDIA GPU is visible to this process (without importing torch or CUDA)."""
    if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl"):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def choose_providers(inference_device: str) -> list[str]:
    """ONNX Runtime providers for `inference_device` ("auto", "cpu", "cuda").

    CUDA only where a GPU is actually present and ORT has the CUDA provider: asking
    onnxruntime-gpu for CUDA on a machine without one logs a loud error first.
    """
    import onnxruntime as ort

    if inference_device == "cpu":
        return [CPU_EP]
    usable = CUDA_EP in ort.get_available_providers() and gpu_present()
    if inference_device.startswith("cuda") and not usable:
        raise RuntimeError(
            "inference_device is cuda but no GPU (or no ONNX Runtime CUDA provider) is present"
        )
    if inference_device not in ("auto",) and not inference_device.startswith("cuda"):
        raise ValueError(f"inference_device must be auto, cpu or cuda, got {inference_device!r}")
    if not usable:
        return [CPU_EP]
    # The CUDA provider needs CUDA and cuDNN in the process: torch's CUDA wheels bring them and
    # load them on import (as in the worker); else ORT looks in nvidia-* wheels and system paths.
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    ort.preload_dlls()
    return [CUDA_EP, CPU_EP]


# --- one ONNX session -------------------------------------------------------------------------


class OrtModel:
    """An exported model: its ORT session, tokenizer and shapes.

    `run` takes numpy inputs and the past cache (numpy arrays, or the device values a
    previous `run` returned) and gives last-position logits [B, V] as numpy and the present
    cache. With IO binding (CUDA) the cache stays on the device between steps; `to_host`
    brings it back when the batch changes shape.
    """

    def __init__(
        self,
        path: Path,
        *,
        providers: list[str],
        io_binding: bool | None = None,
        spin: bool = False,
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.path = path
        cuda = providers[0] == CUDA_EP
        onnx_file = path / "model.onnx"
        self.dtype = "fp32"
        if cuda and (path / "model_fp16.onnx").is_file():
            onnx_file, self.dtype = path / "model_fp16.onnx", "fp16"
        so = ort.SessionOptions()
        # ENABLE_ALL: 2.6-3x faster than no optimisation on a 124M model (KNOWN.md).
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if not cuda and not spin:
            # No spin-waiting in the intra-op pool by default: the scheduler, the event loop
            # and gRPC share these cores. Measured (10.7M model, 2 loaded cores, interleaved):
            # 2.1-2.4 ms/token and 0.9-1.3k tokens/s at 16 streams without spinning against
            # 3.8-8.3 ms/token and 0.5-0.8k tokens/s with it. On cores of its own spinning
            # wins (887 against 577 tokens/s at one stream): settings.inference_spin.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_file), so, providers=providers)
        self.provider = self.session.get_providers()[0]
        if cuda and self.provider != CUDA_EP:
            log.warning("%s: the CUDA provider did not load; serving on %s", path, self.provider)
            if self.dtype == "fp16":  # the CPU provider lacks fp16 kernels: the fp32 graph
                onnx_file, self.dtype = path / "model.onnx", "fp32"
                self.session = ort.InferenceSession(str(onnx_file), so, providers=[CPU_EP])
        # IO binding: +6-11% on a 124M model but -7-12% on 10M on CPU (Python overhead), and
        # on CUDA it keeps the cache on the GPU; so on for CUDA, off for CPU by default.
        self.io_binding = (self.provider == CUDA_EP) if io_binding is None else io_binding
        self.device = "cuda" if self.provider == CUDA_EP else "cpu"

        config = json.loads((path / "config.json").read_text())
        self.context_length = int(config.get("max_position_embeddings", 2048))
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        eos = self.tokenizer.token_to_id(EOS_TOKEN)
        self.eos_token_id = int(config.get("eos_token_id", eos) if eos is None else eos)

        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs()][1:]
        first = inputs[self.past_names[0]]
        self.n_kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.cache_dtype = np.float16 if "float16" in first.type else np.float32
        self.vocab_size = int(self.session.get_outputs()[0].shape[-1] or config["vocab_size"])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.n_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.cache_dtype) for _ in self.past_names]

    def run(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list):
        if not self.io_binding:
            feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
            feeds.update(zip(self.past_names, past, strict=True))
            out = self.session.run(None, feeds)
            return out[0][:, -1, :].astype(np.float32, copy=False), out[1:]
        import onnxruntime as ort

        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", positions)
        for name, value in zip(self.past_names, past, strict=True):
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, self.device, 0)
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, self.device)
        self.session.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy()[:, -1, :].astype(np.float32, copy=False), list(out[1:])

    @staticmethod
    def to_host(cache: list) -> list[np.ndarray]:
        return [c if isinstance(c, np.ndarray) else c.numpy() for c in cache]


# --- requests and the scheduler ---------------------------------------------------------------


@dataclass(eq=False)
class _Sink:
    """Where a request's deltas go: an asyncio queue, fed from the scheduler thread."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def __call__(self, delta: Delta) -> None:
        _post(self.loop, [(self.queue, delta)])


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Delta]]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
        loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue, Delta]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int  # tokens to generate at most (max_new_tokens capped by the context)
    sampler: Sampler
    detok: IncrementalDetokenizer
    emit: Callable[[Delta], None]
    model_id: str
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0
    generated: list[int] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)
    unsent_logprobs: list[float] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False

    @property
    def length(self) -> int:
        """Tokens in this request's cache once its last token is fed."""
        return len(self.prompt_ids) + len(self.generated)


class Scheduler:
    """Runs one model's requests on a thread: prefill one by one, decode as a batch."""

    def __init__(self, model: OrtModel, *, max_batch_size: int, name: str = "model"):
        self.model = model
        self.max_batch_size = max(1, max_batch_size)
        self.max_waiting = QUEUE_PER_SLOT * self.max_batch_size
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._closing = False
        # The batch: one row per active request, caches left-padded to a common length.
        self._rows: list[_Request] = []
        self._past: list = []
        self._mask = np.zeros((0, 0), np.int64)
        # Deltas of the current step, handed over together (see _flush).
        self._outbox: list[tuple[_Request, Delta]] = []
        # Requests ended, by finish reason (monitoring and tests).
        self.finished: collections.Counter[str] = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        return len(self._rows)

    def submit(self, req: _Request) -> None:
        with self._cv:
            if self._closing:
                raise Overloaded("the model is being unloaded; retry")
            if len(self._waiting) >= self.max_waiting:
                raise Overloaded(
                    f"too many requests queued for this model (limit {self.max_waiting}); retry"
                )
            self._waiting.append(req)
            self._cv.notify()

    def cancel(self, req: _Request) -> None:
        """Frees the request's slot at the next step (no more deltas are produced)."""
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def close(self, *, wait: bool = False) -> None:
        """Stops taking requests; requests in flight run to their end."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if wait:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._rows and not self._closing:
                    self._cv.wait()
                if self._closing and not self._waiting and not self._rows:
                    return
                new = []
                while self._waiting and len(self._rows) + len(new) < self.max_batch_size:
                    new.append(self._waiting.popleft())
            try:
                for req in new:
                    self._prefill(req)
                self._drop_finished()
                if self._rows:
                    self._decode_step()
                    self._drop_finished()
            except Exception as e:  # a bug or an ORT failure: fail the requests, keep serving
                log.exception("inference step failed")
                for req in [*new, *self._rows]:
                    if not req.done:
                        self._finish(req, "error", error=e)
                self._rows, self._past = [], []
                self._mask = np.zeros((0, 0), np.int64)
            finally:
                self._flush()

    def _emit(self, req: _Request, delta: Delta) -> None:
        self._outbox.append((req, delta))

    def _flush(self) -> None:
        """Hands the step's deltas over: one event-loop wake-up per loop, not one per row.

        A wake-up per delta cost the scheduler thread ~32 us per token at 16 streams
        (call_soon_threadsafe, and the event loop contending for the GIL); batched, ~7 us.
        """
        if not self._outbox:
            return
        out, self._outbox = self._outbox, []
        loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Delta]]] = {}
        for req, delta in out:
            if isinstance(req.emit, _Sink):
                loops.setdefault(req.emit.loop, []).append((req.emit.queue, delta))
            else:
                req.emit(delta)
        for loop, items in loops.items():
            _post(loop, items)

    def _prefill(self, req: _Request) -> None:
        req.started = time.perf_counter()
        if req.cancelled:
            self._finish(req, "cancelled")
            return
        m = self.model
        n = len(req.prompt_ids)
        ids = np.asarray([req.prompt_ids], dtype=np.int64)
        mask = np.ones((1, n), np.int64)
        pos = np.arange(n, dtype=np.int64)[None]
        logits, present = m.run(ids, mask, pos, m.empty_past(1))
        accepted = self._accept(req, logits[0])
        self._flush()  # the first token goes out now, not after the join's copying
        if accepted:
            self._join(req, present)

    def _decode_step(self) -> None:
        B = len(self._rows)
        ids = np.asarray([[r.generated[-1]] for r in self._rows], dtype=np.int64)
        pos = np.asarray([[r.length - 1] for r in self._rows], dtype=np.int64)
        mask = np.concatenate([self._mask, np.ones((B, 1), np.int64)], axis=1)
        logits, present = self.model.run(ids, mask, pos, self._past)
        self._past, self._mask = present, mask
        # Greedy rows need only the argmax: one numpy call for the batch, not one per row.
        if any(r.sampler.plain_greedy for r in self._rows):
            argmax = logits.argmax(axis=1).tolist()
        else:
            argmax = [None] * B
        for row, req in enumerate(self._rows):
            if not req.done:
                self._accept(req, logits[row], argmax[row])

    def _accept(self, req: _Request, logits: np.ndarray, argmax: int | None = None) -> bool:
        """Samples the request's next token and streams it; False when the request ended.

        `argmax`, when given, is argmax(logits), which a plain greedy sampler would compute.
        """
        if req.cancelled:
            self._finish(req, "cancelled")
            return False
        if argmax is not None and req.sampler.plain_greedy:
            token, logprob = req.sampler.take(argmax), 0.0
        else:
            token, logprob = req.sampler(logits)
        now = time.perf_counter()
        req.first_token = req.first_token or now
        req.last_token = now
        req.generated.append(token)
        req.unsent_ids.append(token)
        if req.params.logprobs:
            req.unsent_logprobs.append(logprob)
        if token == self.model.eos_token_id:
            self._finish(req, "eos")
            return False
        text = req.detok.add(token)
        if req.detok.stopped:
            self._finish(req, "stop", text=text)
            return False
        if len(req.generated) >= req.max_new:
            self._finish(req, "length", text=text)
            return False
        if text:
            self._emit(req, Delta(text, req.unsent_ids, req.unsent_logprobs, model_id=req.model_id))
            req.unsent_ids, req.unsent_logprobs = [], []
        return True

    def _finish(self, req: _Request, reason: str, text: str = "", error: Exception | None = None):
        req.done = True
        self.finished[reason] += 1
        if reason in ("eos", "length", "cancelled", "error"):
            text += req.detok.flush()
        now = time.perf_counter()
        n = len(req.generated)
        first = req.first_token or now
        # Decode speed: tokens after the first over the time they took.
        decode_s = (req.last_token or now) - first
        tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
        timings = Timings(
            queue_ms=((req.started or now) - req.submitted) * 1e3,
            time_to_first_token_ms=(first - req.submitted) * 1e3 if n else 0.0,
            total_ms=(now - req.submitted) * 1e3,
            tokens_per_second=tps,
        )
        delta = Delta(
            text,
            req.unsent_ids,
            req.unsent_logprobs,
            model_id=req.model_id,
            final=True,
            finish_reason=reason,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=n,
            timings=timings,
        )
        req.unsent_ids, req.unsent_logprobs = [], []
        if error is not None:
            delta.finish_reason = "error"
            delta.text = f"{type(error).__name__}: {error}"
        self._emit(req, delta)

    def _join(self, req: _Request, present: list) -> None:
        """Adds a prefilled request's cache [1, H, L, D] as a new row, left-padding as needed."""
        cache = OrtModel.to_host(present)
        L = cache[0].shape[2]
        if not self._rows:
            self._rows, self._past = [req], list(present)
            self._mask = np.ones((1, L), np.int64)
            return
        past = OrtModel.to_host(self._past)
        P = past[0].shape[2]
        T = max(P, L)
        self._past = [
            np.concatenate([_left_pad(a, T - P), _left_pad(b, T - L)], axis=0)
            for a, b in zip(past, cache, strict=True)
        ]
        mask_new = np.concatenate([np.zeros((1, T - L), np.int64), np.ones((1, L), np.int64)], 1)
        self._mask = np.concatenate([_left_pad_mask(self._mask, T - P), mask_new], axis=0)
        self._rows.append(req)

    def _drop_finished(self) -> None:
        """Removes finished or cancelled rows and the padding nobody needs any more."""
        for req in self._rows:
            if req.cancelled and not req.done:
                self._finish(req, "cancelled")
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._past = [], []
            self._mask = np.zeros((0, 0), np.int64)
            return
        past = OrtModel.to_host(self._past)
        mask = self._mask[keep]
        start = int(np.argmax(mask.any(axis=0)))  # first column some row still uses
        self._past = [np.ascontiguousarray(a[keep][:, :, start:]) for a in past]
        self._mask = np.ascontiguousarray(mask[:, start:])
        self._rows = [self._rows[i] for i in keep]


def _left_pad(a: np.ndarray, n: int) -> np.ndarray:
    if n == 0:
        return a
    pad = np.zeros((a.shape[0], a.shape[1], n, a.shape[3]), a.dtype)
    return np.concatenate([pad, a], axis=2)


def _left_pad_mask(m: np.ndarray, n: int) -> np.ndarray:
    if n == 0:
        return m
    return np.concatenate([np.zeros((m.shape[0], n), m.dtype), m], axis=1)


# --- the engine -------------------------------------------------------------------------------


@dataclass
class _Loaded:
    resolved: ResolvedModel
    model: OrtModel
    scheduler: Scheduler


class Engine:
    """Loads models lazily (LRU of settings.max_loaded_models) and streams generations."""

    def __init__(
        self, settings: Settings, resolver: ModelResolver, *, io_binding: bool | None = None
    ):
        self.settings = settings
        self.resolver = resolver
        self.providers = choose_providers(settings.inference_device)
        self._io_binding = io_binding
        self._loaded: collections.OrderedDict[str, _Loaded] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}

    # -- models

    async def _resolve(self, owner: str, ref: str) -> ResolvedModel:
        if not ref:
            raise InvalidArgument("model", "is required")
        try:
            return await asyncio.to_thread(self.resolver.resolve, owner, ref)
        except KeyError:
            raise ModelNotFound(f"model {ref!r} not found") from None

    async def _get(self, owner: str, ref: str) -> _Loaded:
        resolved = await self._resolve(owner, ref)
        if resolved.state == "TRAINING":
            raise ModelNotReady(f"model {ref!r} is still training; it serves once its job succeeds")
        if resolved.state != "READY":
            raise ModelNotReady(f"model {ref!r} is {resolved.state.lower()}; it cannot serve")
        return await self._load(resolved)

    async def _load(self, resolved: ResolvedModel) -> _Loaded:
        key = resolved.model_id
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        if key in self._loading:
            return await asyncio.shield(self._loading[key])
        fut = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            model = await asyncio.to_thread(
                OrtModel,
                resolved.path,
                providers=self.providers,
                io_binding=self._io_binding,
                spin=self.settings.inference_spin,
            )
            sched = Scheduler(model, max_batch_size=self.settings.max_batch_size, name=key)
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

    async def model_info(self, owner: str, ref: str, *, load: bool = True) -> ModelInfo:
        """Facts about a model; loads it first unless `load` is false."""
        if load:
            loaded = await self._get(owner, ref)
        else:
            resolved = await self._resolve(owner, ref)
            loaded = self._loaded.get(resolved.model_id)
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
        )

    # -- generation

    def check_params(self, params: SamplingParams) -> None:
        """Raises InvalidArgument naming the sampling field and its limit."""
        limit = self.settings.max_new_tokens_limit
        if not 1 <= params.max_new_tokens <= limit:
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

    async def generate(
        self,
        owner: str,
        model: str,
        prompt: str,
        params: SamplingParams,
        *,
        truncate_prompt: bool = False,
    ) -> AsyncIterator[Delta]:
        """Streams the generation as deltas; the last one has `final` set.

        Raises InvalidArgument, ModelNotFound, ModelNotReady or Overloaded before the first
        delta. Closing the iterator (or cancelling its task) cancels the request.
        """
        self.check_params(params)
        if not prompt:
            raise InvalidArgument("prompt", "must not be empty")
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidArgument(
                "prompt",
                f"is {len(prompt)} characters; the limit is {self.settings.max_prompt_chars}",
            )
        loaded = await self._get(owner, model)
        m = loaded.model
        ids = await asyncio.to_thread(m.encode, prompt)
        # A char tokenizer has no unknown token: name what it would silently drop.
        missing = set(prompt) - set(await asyncio.to_thread(m.decode, ids))
        if missing:
            shown = "".join(sorted(missing)[:20])
            raise InvalidArgument(
                "prompt", f"has characters outside this model's vocabulary: {shown!r}"
            )
        ctx = m.context_length
        if len(ids) > ctx - 1:
            if not truncate_prompt:
                raise InvalidArgument(
                    "prompt",
                    f"is {len(ids)} tokens; the model's context length is {ctx}, so the limit "
                    f"is {ctx - 1} prompt tokens (set truncate_prompt to keep the last ones)",
                )
            ids = ids[-(ctx - 1) :]
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        emit = _Sink(asyncio.get_running_loop(), queue)
        req = _Request(
            prompt_ids=ids,
            params=params,
            max_new=min(params.max_new_tokens, ctx - len(ids)),
            sampler=Sampler(params, vocab_size=m.vocab_size, prompt_ids=ids),
            detok=IncrementalDetokenizer(m.decode, stop=params.stop, prompt_ids=ids),
            emit=emit,
            model_id=loaded.resolved.model_id,
        )
        loaded.scheduler.submit(req)
        try:
            while True:
                delta = await queue.get()
                if delta.final and delta.finish_reason == "error":
                    raise InferenceError(f"generation failed: {delta.text}")
                yield delta
                if delta.final:
                    return
        finally:
            if not req.done:
                loaded.scheduler.cancel(req)

    async def complete(
        self, owner: str, model: str, prompt: str, params: SamplingParams, **kw
    ) -> Delta:
        """The whole generation as one Delta (text and tokens joined, final fields set)."""
        text, ids, logprobs = [], [], []
        async for d in self.generate(owner, model, prompt, params, **kw):
            text.append(d.text)
            ids += d.token_ids
            logprobs += d.logprobs
            if d.final:
                d.text, d.token_ids, d.logprobs = "".join(text), ids, logprobs
                return d
        raise InferenceError("generation ended without a final delta")

    def stats(self) -> dict[str, dict]:
        """Per loaded model: active batch rows, queued requests, finished ones by reason."""
        return {
            k: {
                "active": v.scheduler.active,
                "queued": len(v.scheduler._waiting),
                "finished": dict(v.scheduler.finished),
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
            await asyncio.to_thread(item.scheduler._thread.join)
