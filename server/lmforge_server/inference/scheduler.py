"""The batching scheduler: one thread per loaded model that runs its requests on ONNX Runtime.

The KV cache is the model's `KVCache`: one preallocated slot of the full context per batch
row. A request takes a free slot when it is admitted and gives it back when it ends; ONNX
Runtime writes each step's keys and values into the slots in place. So joining or leaving
the batch copies nothing, and a decode step costs the weights plus each row's own cache.

Off the asyncio event loop, each turn of the loop:
- prefills every waiting request that fits in the batch: requests in adjacent slots in one
  ONNX Runtime call, right-padded (`n` samples of one request share that prefill, copied
  into their slots). A prompt that starts with a prefix recently prefilled for this model
  reuses that prefix's KV cache and prefills only the rest: from the slot it is given when
  that slot still holds the prefix (nothing copied), else from `PrefixCache`. While other
  rows decode, a long prompt is prefilled PREFILL_CHUNK tokens per turn, so the running
  streams get a token between its chunks instead of waiting for all of it;
- runs one decode step of all active rows as one batch: slots 0 .. the highest active one
  (a free slot in between runs a throwaway row that writes past its own end).
A row that reaches the context with `context_shift` set leaves the batch and is prefilled
again in its slot from the most recent half of its window (llama.cpp's context shift), then
rejoins.

Failures stay with their cause: a request whose sampling raises ends alone with "error";
only an ONNX Runtime failure of the whole step fails the rows of that step.

A step's deltas reach the event loop in one hand-over (one wake-up, not one per row).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lmforge_server.inference.detokenize import IncrementalDetokenizer
from lmforge_server.inference.errors import Overloaded
from lmforge_server.inference.sampling import Sampler, SamplingParams
from lmforge_server.inference.session import OrtModel

log = logging.getLogger(__name__)

# Requests waiting for a batch slot, per model, beyond which new ones are refused.
QUEUE_PER_SLOT = 16
# Prefix reuse: prompts at least this long are remembered, and a hit must share this many.
MIN_PREFIX_TOKENS = 16
PREFIX_CACHE_BYTES = 64 << 20
# Prompt tokens prefilled per scheduler turn for a long prompt while other rows decode
# (chunked prefill; with nothing else running a prompt goes in whole). Measured (10.7M model,
# 8 streams decoding while a 1,000-token prompt arrives, 2 loaded cores, interleaved runs):
# inter-token p99 80-134 ms with 64 against 124-301 ms with 128 (16 and 32: 114-133 ms, and
# a p50 twice as high, since most turns then carry a chunk).
PREFILL_CHUNK = 64


@dataclass
class Timings:
    queue_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class Delta:
    """One streamed piece of one sample: text since its previous delta and the tokens behind it."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    model_id: str
    final: bool = False
    # Set on the final delta: "length", "stop", "eos", "cancelled" (or "error").
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings | None = None
    # Which of the request's `n` samples this is.
    index: int = 0
    # Per token: the top_logprobs most likely (token id, log-probability) pairs.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    request_id: str = ""
    # Tokens of the prompt whose KV cache came from an earlier request (prefix reuse).
    cached_prompt_tokens: int = 0
    # Times the context was shifted (context_shift) during this sample.
    context_shifts: int = 0


# --- handing deltas to the event loop ------------------------------------------------------


@dataclass(eq=False)
class Sink:
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


# --- requests -------------------------------------------------------------------------------


@dataclass(eq=False)
class Request:
    """One sample being generated: a batch row once prefilled."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new: int  # tokens to generate at most
    sampler: Sampler
    detok: IncrementalDetokenizer
    emit: Callable[[Delta], None]
    model_id: str
    index: int = 0
    request_id: str = ""
    # Roll the window forward at the context instead of ending there.
    context_shift: bool = False
    # The KV cache slot this sample holds while admitted (-1: none).
    slot: int = -1
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0
    generated: list[int] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)
    unsent_logprobs: list[float] = field(default_factory=list)
    unsent_top: list[list[tuple[int, float]]] = field(default_factory=list)
    # The cache holds the tokens (prompt + generated)[window_start:].
    window_start: int = 0
    context_shifts: int = 0
    cached_prompt_tokens: int = 0
    cancelled: bool = False
    done: bool = False

    @property
    def length(self) -> int:
        """Tokens in this request's cache once its last token is fed."""
        return len(self.prompt_ids) + len(self.generated) - self.window_start

    def window(self) -> list[int]:
        return (self.prompt_ids + self.generated)[self.window_start :]


def make_requests(
    model: OrtModel,
    prompt_ids: list[int],
    params: SamplingParams,
    emit: Callable[[Delta], None],
    *,
    model_id: str,
    max_new: int,
    request_id: str = "",
    context_shift: bool = False,
) -> list[Request]:
    """The `params.n` samples of one request, each with its own sampler and detokenizer."""
    return [
        Request(
            prompt_ids=prompt_ids,
            params=params,
            max_new=max_new,
            sampler=Sampler(
                params,
                vocab_size=model.vocab_size,
                prompt_ids=prompt_ids,
                eos_token_id=model.eos_token_id,
                index=i,
            ),
            detok=IncrementalDetokenizer(
                model.decode,
                stop=params.stop,
                prompt_ids=prompt_ids,
                include_stop=params.include_stop_str_in_output,
            ),
            emit=emit,
            model_id=model_id,
            index=i,
            request_id=request_id,
            context_shift=context_shift,
        )
        for i in range(params.n)
    ]


@dataclass(eq=False)
class Group:
    """A request's samples (n of them), prefilled once from the same ids into the first
    sample's slot (and copied to the others' once done)."""

    rows: list[Request]
    ids: list[int]
    # The first `done` ids are in the first row's slot already (prefix reuse, chunks).
    done: int = 0
    # The prompt whose keys and values the first row's slot still held when it was given
    # to this group (see Scheduler._resident).
    resident: list[int] | None = None

    @property
    def slot(self) -> int:
        return self.rows[0].slot


# --- prefix reuse ---------------------------------------------------------------------------


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share (slice comparisons, which run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """A small LRU of prompts' KV caches, bounded in bytes (touched by the scheduler thread only).

    A causal model's cache for the first k tokens depends on those tokens alone, so any
    common prefix with a remembered prompt can be reused, not only a whole one.
    """

    def __init__(self, max_bytes: int = PREFIX_CACHE_BYTES, min_tokens: int = MIN_PREFIX_TOKENS):
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: collections.OrderedDict[tuple[int, ...], list[np.ndarray]] = (
            collections.OrderedDict()
        )
        # Prompts by their first min_tokens ids: only those can share a reusable prefix, so
        # a lookup compares a few candidates, not every remembered prompt (a full cache of
        # 64-token prompts holds ~50; comparing them all cost ~0.5 ms of each request).
        self._by_head: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
        self.bytes = 0
        self.hits = 0

    def put(self, ids: list[int], cache: list[np.ndarray]) -> None:
        key = tuple(ids)
        size = sum(a.nbytes for a in cache)
        if len(key) < self.min_tokens or size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = cache
        self._by_head.setdefault(key[: self.min_tokens], set()).add(key)
        self.bytes += size
        while self.bytes > self.max_bytes:
            old_key, old = self._entries.popitem(last=False)
            self.bytes -= sum(a.nbytes for a in old)
            same_head = self._by_head[old_key[: self.min_tokens]]
            same_head.discard(old_key)
            if not same_head:
                del self._by_head[old_key[: self.min_tokens]]

    def holds(self, ids: list[int]) -> bool:
        """Whether `put(ids, ...)` would store nothing (checked before reading a slot out)."""
        return len(ids) < self.min_tokens or tuple(ids) in self._entries

    def get(self, ids: list[int], longer_than: int = 0) -> tuple[int, list[np.ndarray] | None]:
        """(k, cache of the first k tokens) for the longest remembered prefix of `ids`,
        leaving at least one token to prefill; (0, None) when none is long enough or none
        is longer than `longer_than` tokens (what the caller holds already)."""
        best, best_key = 0, None
        target = ids[:-1]
        for key in self._by_head.get(tuple(ids[: self.min_tokens]), ()):
            n = min(len(key), len(target))
            if n < max(self.min_tokens, best + 1, longer_than + 1):
                continue
            k = common_prefix(list(key[:n]), target[:n])
            if k > best:
                best, best_key = k, key
        if best < self.min_tokens or best <= longer_than or best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        return best, [a[:, :, :best] for a in self._entries[best_key]]


# --- the scheduler ---------------------------------------------------------------------------


class Scheduler:
    """Runs one model's requests on a thread: prefill new ones together, decode as a batch."""

    def __init__(
        self,
        model: OrtModel,
        *,
        max_batch_size: int,
        name: str = "model",
        prefix_cache: PrefixCache | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        reuse_resident: bool = True,
    ):
        self.model = model
        self.max_batch_size = max(1, max_batch_size)
        self.max_waiting = QUEUE_PER_SLOT * self.max_batch_size
        self.prefixes = prefix_cache if prefix_cache is not None else PrefixCache()
        self.prefill_chunk = max(1, prefill_chunk)
        self.cache = model.new_cache(self.max_batch_size)
        self._cv = threading.Condition()
        self._waiting: collections.deque[Group] = collections.deque()
        self._closing = False
        # Who holds each cache slot, and how many positions of it are filled.
        self._holders: list[Request | None] = [None] * self.max_batch_size
        self._lens = np.zeros(self.max_batch_size, np.int32)
        # The prompt whose keys and values each slot holds at positions [0, len(prompt)),
        # from the prefill graph: still there once the slot is given back, until something
        # writes over them. A prompt given that slot reuses the prefix it shares with it, as
        # it would one from the PrefixCache, without copying it in (a sequence of requests,
        # a conversation's turns, runs in the same slot). `reuse_resident=False` turns this
        # off (tests of the PrefixCache on its own).
        self._resident: list[list[int] | None] = [None] * self.max_batch_size
        self.reuse_resident = reuse_resident
        self.resident_hits = 0
        # The batch: the samples being decoded (each in its own slot).
        self._rows: list[Request] = []
        # Groups that hold slots outside the batch: rows that reached the context and are
        # prefilled again (context_shift), and long prompts between prefill chunks.
        self._carried: list[Group] = []
        # Deltas of the current step, handed over together (see _flush).
        self._outbox: list[tuple[Request, Delta]] = []
        # Samples ended, by finish reason (monitoring and tests).
        self.finished: collections.Counter[str] = collections.Counter()
        # Prefill calls and the groups they held (batched prefill, for monitoring and tests).
        self.prefill_calls = 0
        self.prefilled_groups = 0
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def check_capacity(self) -> None:
        """Raises Overloaded when a new request would be refused (cheap; before tokenising)."""
        if self._closing:
            raise Overloaded("the model is being unloaded; retry")
        if len(self._waiting) >= self.max_waiting:
            raise Overloaded(
                f"too many requests queued for this model (limit {self.max_waiting}); retry"
            )

    def submit(self, rows: list[Request]) -> None:
        """Queues a request's samples (all prefilled from the first one's prompt)."""
        with self._cv:
            self.check_capacity()
            self._waiting.append(Group(rows, list(rows[0].prompt_ids)))
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """Frees the sample's slot at the next step (no more deltas are produced)."""
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

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._rows or self._carried or self._closing):
                    self._cv.wait()
                if self._closing and not (self._waiting or self._rows or self._carried):
                    return
                new = list(self._carried)
                self._carried = []
                free = [s for s, holder in enumerate(self._holders) if holder is None]
                while self._waiting and len(self._waiting[0].rows) <= len(free):
                    group = self._waiting.popleft()
                    for req in group.rows:
                        req.slot = free.pop(0)
                        self._holders[req.slot] = req
                        self._lens[req.slot] = 0
                    if self.reuse_resident:
                        group.resident = self._resident[group.slot]
                    for req in group.rows:  # what they held is about to be written over
                        self._resident[req.slot] = None
                    new.append(group)
            try:
                if new:
                    self._prefill(new)
                self._drop_finished()
                if self._rows:
                    self._decode_step()
                    self._drop_finished()
            except Exception as e:  # an ONNX Runtime failure: fail this step's rows, keep serving
                log.exception("inference step failed")
                for req in [*(r for g in new for r in g.rows), *self._rows]:
                    if not req.done:
                        self._finish(req, "error", error=e)
                self._rows, self._carried = [], []
                self._resident = [None] * self.max_batch_size  # a failed run wrote who knows what
                for req in self._holders:
                    if req is not None:
                        self._release(req)
            finally:
                self._flush()

    def _emit(self, req: Request, delta: Delta) -> None:
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
            if isinstance(req.emit, Sink):
                loops.setdefault(req.emit.loop, []).append((req.emit.queue, delta))
            else:
                req.emit(delta)
        for loop, items in loops.items():
            _post(loop, items)

    # -- prefill

    def _prefill(self, groups: list[Group]) -> None:
        now = time.perf_counter()
        live = []
        for g in groups:
            for req in g.rows:
                req.started = req.started or now
                if req.cancelled and not req.done:
                    self._finish(req, "cancelled")
            if all(r.done for r in g.rows):
                for req in g.rows:
                    self._release(req)
            else:
                live.append(g)
        # A prompt sharing a cached prefix prefills on top of it, a long one a chunk per turn;
        # the others prefill together, right-padded.
        cold = []
        for g in live:
            if g.done == 0 and not g.rows[0].context_shifts:
                self._reuse_prefix(g)
            # Chunks only when other rows wait for their tokens; else the whole prompt at once.
            busy = bool(self._rows) or len(live) > 1
            if busy and len(g.ids) - g.done > self.prefill_chunk:
                self._run_chunk(g)
                self._carried.append(g)
            elif g.done:
                self._run_prefill([g])
            else:
                cold.append(g)
        # One call per run of adjacent slots (groups admitted together usually are).
        cold.sort(key=lambda g: g.slot)
        run: list[Group] = []
        for g in cold:
            if run and g.slot != run[-1].slot + 1:
                self._run_prefill(run)
                run = []
            run.append(g)
        if run:
            self._run_prefill(run)

    def _reuse_prefix(self, g: Group) -> None:
        """Starts the group after the longest prefix of its prompt whose cache is at hand: in
        its slot already (that slot's last prompt, nothing copied) or remembered by the
        PrefixCache (copied into the slot). One prompt token is always left to prefill."""
        k = 0
        if g.resident is not None:
            k = common_prefix(g.resident, g.ids[:-1])
            if k < self.prefixes.min_tokens:
                k = 0
        k_lru, past = self.prefixes.get(g.ids, longer_than=k)
        if past is not None:
            self.cache.write(g.slot, past)
            k = k_lru
        elif k:
            self.resident_hits += 1
        if k:
            g.done = self._lens[g.slot] = k
            for req in g.rows:
                req.cached_prompt_tokens = k

    def _run_chunk(self, g: Group) -> None:
        """Prefills the group's next `prefill_chunk` ids into its slot (no token yet)."""
        P = g.done
        ids = np.asarray([g.ids[P : P + self.prefill_chunk]], np.int64)
        end = P + ids.shape[1]
        self.model.prefill(self.cache, ids, [end - 1], g.slot)
        self.prefill_calls += 1
        g.done = self._lens[g.slot] = end

    def _run_prefill(self, groups: list[Group]) -> None:
        """Prefills the rest of each group's ids into its slot (the groups' slots adjacent;
        each either starts empty or has `done` ids already, then alone) and takes each
        group's first tokens."""
        m = self.model
        lens = [len(g.ids) - g.done for g in groups]
        S = max(lens)
        ids = np.zeros((len(groups), S), np.int64)  # right-padded
        for i, (g, n) in enumerate(zip(groups, lens, strict=True)):
            ids[i, :n] = g.ids[g.done :]
        logits = m.prefill(self.cache, ids, [len(g.ids) - 1 for g in groups], groups[0].slot)
        self.prefill_calls += 1
        self.prefilled_groups += len(groups)
        joins: list[Request] = []
        # Remembered for prefix reuse after the first tokens go out; the slots are taken
        # now, since a request that ends at its first token gives its slot back.
        remember = [
            (g.ids, g.slot)
            for g in groups
            if not g.rows[0].context_shifts and len(g.ids) >= self.prefixes.min_tokens
        ]
        for i, g in enumerate(groups):
            L, first = len(g.ids), g.slot
            g.done = self._lens[first] = L
            for req in g.rows[1:]:  # n samples: one prefill, copied into each slot
                self.cache.copy(first, req.slot, L)
                self._lens[req.slot] = L
            if not g.rows[0].context_shifts:
                for req in g.rows:
                    self._resident[req.slot] = g.ids
            for req in g.rows:
                if not req.done and self._accept(req, logits[i]):
                    joins.append(req)
                elif req.done:
                    self._release(req)
        self._flush()  # first tokens go out now
        for ids, slot in remember:  # a released slot keeps its cache until the next turn
            if not self.prefixes.holds(ids):
                self.prefixes.put(ids, self.cache.read(slot, len(ids)))
        self._rows += joins

    # -- decode

    def _decode_step(self) -> None:
        """One token for every row: slots 0 .. the highest active one in one call."""
        rows = self._rows
        B = max(r.slot for r in rows) + 1
        ids = np.zeros((B, 1), np.int64)
        # A slot not in the batch (free, or a prompt between chunks) writes a throwaway row
        # at its own end, which its next prefill overwrites.
        seqlens = np.minimum(self._lens[:B], self.model.context_length - 1)
        for s in range(B):
            if self._holders[s] is None:  # its throwaway row lands on position 0
                self._resident[s] = None
        for r in rows:
            ids[r.slot, 0] = r.generated[-1]
        logits = self.model.run(self.cache, ids, seqlens, 0)
        for r in rows:
            self._lens[r.slot] += 1
        # Greedy rows need only the argmax: one numpy call for the batch, not one per row.
        argmax = (
            logits.argmax(axis=1).tolist() if any(r.sampler.plain_greedy for r in rows) else None
        )
        for req in rows:
            if not req.done:
                self._accept(req, logits[req.slot], None if argmax is None else argmax[req.slot])

    def _accept(self, req: Request, logits: np.ndarray, argmax: int | None = None) -> bool:
        """Samples the request's next token and streams it; False when the request ended.

        `argmax`, when given, is argmax(logits), which a plain greedy sampler would compute.
        A sampling failure ends this request alone.
        """
        if req.cancelled:
            self._finish(req, "cancelled")
            return False
        try:
            if argmax is not None and req.sampler.plain_greedy:
                token, logprob, top = req.sampler.take(argmax), 0.0, None
            else:
                token, logprob, top = req.sampler.pick(logits)
        except Exception as e:  # e.g. probabilities that are not numbers: this request's fault
            log.exception("sampling failed for one request")
            self._finish(req, "error", error=e)
            return False
        now = time.perf_counter()
        req.first_token = req.first_token or now
        req.last_token = now
        req.generated.append(token)
        req.unsent_ids.append(token)
        if req.params.logprobs:
            req.unsent_logprobs.append(logprob)
        if top is not None:
            req.unsent_top.append(top)
        if token == self.model.eos_token_id:
            self._finish(req, "eos")
            return False
        p = req.params
        armed = len(req.generated) >= p.min_tokens
        if token in p.stop_token_ids:
            text = req.detok.add(token) if p.include_stop_str_in_output else ""
            self._finish(req, "stop", text=text)
            return False
        req.detok.stop_armed = armed
        text = req.detok.add(token)
        if req.detok.stopped:
            self._finish(req, "stop", text=text)
            return False
        if len(req.generated) >= req.max_new:
            self._finish(req, "length", text=text)
            return False
        if text:
            self._emit(req, self._delta(req, text))
        return True

    def _delta(self, req: Request, text: str, **final) -> Delta:
        d = Delta(
            text,
            req.unsent_ids,
            req.unsent_logprobs,
            model_id=req.model_id,
            index=req.index,
            top_logprobs=req.unsent_top,
            request_id=req.request_id,
            **final,
        )
        req.unsent_ids, req.unsent_logprobs, req.unsent_top = [], [], []
        return d

    def _finish(
        self,
        req: Request,
        reason: str,
        text: str = "",
        error: Exception | None = None,
    ):
        req.done = True
        self.finished[reason] += 1
        text += req.detok.flush()  # nothing after a stop sequence: it cleared what it held
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
        delta = self._delta(
            req,
            text,
            final=True,
            finish_reason="error" if error is not None else reason,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=n,
            timings=timings,
            cached_prompt_tokens=req.cached_prompt_tokens,
            context_shifts=req.context_shifts,
        )
        if error is not None:
            delta.text = f"{type(error).__name__}: {error}"
        self._emit(req, delta)

    # -- the batch

    def _release(self, req: Request) -> None:
        """Gives the sample's slot back (nothing is copied or cleared)."""
        if req.slot >= 0 and self._holders[req.slot] is req:
            self._holders[req.slot] = None
            self._lens[req.slot] = 0
        req.slot = -1

    def _drop_finished(self) -> None:
        """Removes finished or cancelled rows (freeing their slots), and rows at the context
        that shift it."""
        ctx = self.model.context_length
        keep = []
        for req in self._rows:
            if req.cancelled and not req.done:
                self._finish(req, "cancelled")
            elif not req.done and req.length > ctx and not req.context_shift:
                self._finish(req, "length")  # max_new keeps this from happening; a guard
            elif not req.done and req.length > ctx:
                # Feeding the last token would pass the context: prefill the recent half again.
                n = max(1, ctx // 2)
                req.window_start = len(req.prompt_ids) + len(req.generated) - n
                req.context_shifts += 1
                self._lens[req.slot] = 0
                self._resident[req.slot] = None
                self._carried.append(Group([req], req.window()))
                continue
            if req.done:
                self._release(req)
            else:
                keep.append(req)
        self._rows = keep
