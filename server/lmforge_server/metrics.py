"""Prometheus metrics for every lmforge process: gRPC requests (an aio server interceptor),
generation timings, queue and batch gauges, jobs and queue length from Redis, training
speed and lease renewals from the worker.

Each process exposes its own registry at `/metrics` on an address of its own
(`Settings.api_metrics_addr`, `inference_metrics_addr`, `worker_metrics_addr`; empty turns
it off). Metric names follow Prometheus conventions: `_total` counters, `_seconds`
histograms.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import REGISTRY, Collector

log = logging.getLogger(__name__)

# Latency buckets from 1 ms to 60 s (gRPC calls) and 1 ms to 10 s (per token).
_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)

RPC_REQUESTS = Counter(
    "lmforge_grpc_requests_total",
    "gRPC calls handled, by method and status code.",
    ["server", "method", "code"],
)
RPC_LATENCY = Histogram(
    "lmforge_grpc_request_duration_seconds",
    "Time from a call's start to its status (whole stream for streaming calls).",
    ["server", "method"],
    buckets=_RPC_BUCKETS,
)
OPEN_STREAMS = Gauge(
    "lmforge_grpc_open_streams", "Streaming calls in progress.", ["server", "method"]
)

GENERATED_TOKENS = Counter(
    "lmforge_generation_tokens_total", "Tokens generated, by model.", ["model"]
)
PROMPT_TOKENS = Counter("lmforge_prompt_tokens_total", "Prompt tokens processed.", ["model"])
GENERATIONS = Counter(
    "lmforge_generations_total", "Generations finished, by finish reason.", ["model", "reason"]
)
TIME_TO_FIRST_TOKEN = Histogram(
    "lmforge_time_to_first_token_seconds",
    "From a request's arrival to its first token.",
    ["model"],
    buckets=_TOKEN_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "lmforge_inter_token_latency_seconds",
    "Mean time between tokens of one generation, observed once per generation.",
    ["model"],
    buckets=_TOKEN_BUCKETS,
)

REAPER_ACTIONS = Counter(
    "lmforge_reaper_actions_total",
    "Jobs whose worker was lost, by what the reaper did (requeued or cancelled).",
    ["action"],
)

TRAINING_TOKENS_PER_SECOND = Gauge(
    "lmforge_training_tokens_per_second", "Training throughput of a running job.", ["job"]
)
TRAINING_STEP_SECONDS = Gauge(
    "lmforge_training_step_seconds", "Mean wall time of the job's recent steps.", ["job"]
)
TRAINING_FLOPS = Gauge(
    "lmforge_training_flops_per_second",
    "Achieved training FLOP/s (tokens/s times 6N + 12 L d T per token).",
    ["job"],
)
TRAINING_MFU = Gauge(
    "lmforge_training_mfu",
    "Model FLOPs utilisation: achieved FLOP/s over the device peak (when it is known).",
    ["job"],
)
TRAINING_STEP = Gauge("lmforge_training_step", "The job's latest step.", ["job"])
LEASE_RENEWALS = Counter(
    "lmforge_lease_renewals_total", "Job lease renewals by the worker's heartbeat, by result.",
    ["result"],
)  # fmt: skip
ARTIFACT_DOWNLOADS = Counter(
    "lmforge_artifact_downloads_total",
    "Files downloaded from the artifact store into this process's local cache, by kind "
    "(datasets, jobs, models); a cache hit downloads none.",
    ["kind"],
)


class _Live(Collector):
    """The scrape-time collectors of every server running in this process, as one
    registered collector. A process runs one server; tests run several side by side, so
    series several of them report are kept once (the first)."""

    def __init__(self) -> None:
        self.collectors: list[Collector] = []
        self.registered = False

    def add(self, collector: Collector) -> None:
        self.collectors.append(collector)
        if not self.registered:
            REGISTRY.register(self)
            self.registered = True

    def remove(self, collector: Collector) -> None:
        self.collectors.remove(collector)
        if not self.collectors and self.registered:
            REGISTRY.unregister(self)
            self.registered = False

    def collect(self):
        families: dict[str, Any] = {}
        seen: set[tuple] = set()
        for collector in list(self.collectors):
            for family in collector.collect():
                samples = family.samples
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = family
                    family.samples = []
                for sample in samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key not in seen:
                        seen.add(key)
                        merged.samples.append(sample)
        yield from families.values()


_LIVE = _Live()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes are not worth a log line each
        pass


def _start_http_server(host: str, port: int) -> ThreadingWSGIServer:
    """prometheus_client's start_http_server, but its loop checks for a stop every 50 ms:
    with the default 0.5 s, `close` (and so every server's stop) waited 0.25 s on average."""

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    httpd = make_server(host, port, make_wsgi_app(REGISTRY), Server, handler_class=_QuietHandler)
    threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="metrics", daemon=True
    ).start()
    return httpd


class Endpoint:
    """A server's metrics: its scrape-time collectors and, when an address is given,
    /metrics served over HTTP from a daemon thread. `close` undoes both."""

    def __init__(self, addr: str, *collectors: Collector):
        self.collectors = collectors
        for collector in collectors:
            _LIVE.add(collector)
        self.port: int | None = None
        self._http = None
        if addr:
            host, _, port = addr.rpartition(":")
            try:
                self._http = _start_http_server(host or "127.0.0.1", int(port))
            except OSError as e:  # a port in use is logged, never fatal
                log.warning("metrics not served on %s: %s", addr, e)
            else:
                self.port = self._http.server_address[1]
                log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        for collector in self.collectors:
            _LIVE.remove(collector)
        self.collectors = ()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def serve_metrics(addr: str, *collectors: Collector) -> Endpoint:
    """Adds the server's collectors and serves this process's registry at
    http://addr/metrics (nothing over HTTP when addr is empty)."""
    return Endpoint(addr, *collectors)


# ---------------------------------------------------------------- gRPC servers


def _method_name(full: str) -> str:
    """ "/lmforge.v1.JobService/GetJob" -> "JobService/GetJob"."""
    service, _, method = full.lstrip("/").rpartition("/")
    return f"{service.rpartition('.')[2]}/{method}"


_INT_CODES = {c.value[0]: c.name for c in grpc.StatusCode}


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call by method and status code, times it, and tracks open streams."""

    def __init__(self, server: str):
        self.server = server

    async def intercept_service(
        self,
        continuation: Callable,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(("/grpc.", "/grpc_")):
            return handler  # health and reflection are not the product's traffic
        method = _method_name(details.method)
        labels = (self.server, method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, labels),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, labels),
                handler.request_deserializer,
                handler.response_serializer,
            )
        wrap = self._stream(handler.unary_stream or handler.stream_stream, labels)
        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream is not None
            else grpc.stream_stream_rpc_method_handler
        )
        return make(wrap, handler.request_deserializer, handler.response_serializer)

    def _done(self, labels: tuple[str, str], context, started: float, error) -> None:
        RPC_REQUESTS.labels(*labels, _status(context, error)).inc()
        RPC_LATENCY.labels(*labels).observe(time.perf_counter() - started)

    def _unary(self, behavior: Callable, labels: tuple[str, str]) -> Callable:
        async def wrapper(request, context):
            started, error = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                self._done(labels, context, started, error)

        return wrapper

    def _stream(self, behavior: Callable, labels: tuple[str, str]) -> Callable:
        # A streaming handler is an async generator, or a coroutine that calls context.write.
        if not inspect.isasyncgenfunction(behavior):

            async def writer(request, context):
                OPEN_STREAMS.labels(*labels).inc()
                try:
                    return await self._unary(behavior, labels)(request, context)
                finally:
                    OPEN_STREAMS.labels(*labels).dec()

            return writer

        async def wrapper(request, context):
            started, error = time.perf_counter(), None
            OPEN_STREAMS.labels(*labels).inc()
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as e:
                error = e
                raise
            finally:
                OPEN_STREAMS.labels(*labels).dec()
                self._done(labels, context, started, error)

        return wrapper


def _status(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The call's status code name: what the handler set or aborted with, else what gRPC
    makes of how it ended (OK, CANCELLED for a task cancelled by the client, UNKNOWN)."""
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        if isinstance(code, grpc.StatusCode):
            return code.name
        return _INT_CODES.get(int(code), "UNKNOWN")
    if error is None or isinstance(error, GeneratorExit):
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"


# ---------------------------------------------------------------- inference


def observe_generation(final) -> None:
    """Records one finished generation from its final delta (the engine's `Delta`: model_id,
    prompt/completion tokens, finish_reason, timings)."""
    model, n, t = final.model_id, final.completion_tokens, final.timings
    GENERATED_TOKENS.labels(model).inc(n)
    PROMPT_TOKENS.labels(model).inc(final.prompt_tokens)
    GENERATIONS.labels(model, final.finish_reason).inc()
    if t is None or n <= 0:
        return
    TIME_TO_FIRST_TOKEN.labels(model).observe(t.time_to_first_token_ms / 1000)
    if n > 1:
        # TTFT counts from arrival, so the decode phase is what follows it.
        decoding_ms = max(t.total_ms - t.time_to_first_token_ms, 0.0)
        INTER_TOKEN_LATENCY.labels(model).observe(decoding_ms / 1000 / (n - 1))


class EngineCollector(Collector):
    """Loaded models, queue depth and batch size per model, read from the engine at scrape
    time through `snapshot()`: [(model_id, waiting, running)]."""

    def __init__(self, snapshot: Callable[[], Iterable[tuple[str, int, int]]]):
        self.snapshot = snapshot

    def collect(self):
        loaded = GaugeMetricFamily("lmforge_loaded_models", "Models loaded in this server.")
        queue = GaugeMetricFamily(
            "lmforge_inference_queue_depth", "Requests waiting for a slot.", labels=["model"]
        )
        batch = GaugeMetricFamily(
            "lmforge_inference_batch_size", "Requests decoding together.", labels=["model"]
        )
        rows = list(self.snapshot())
        loaded.add_metric([], len(rows))
        for model_id, waiting, running in rows:
            queue.add_metric([model_id], waiting)
            batch.add_metric([model_id], running)
        yield from (loaded, queue, batch)


# ---------------------------------------------------------------- API server


class JobsCollector(Collector):
    """Active jobs by state and the training queue's length, read from Redis at scrape
    time through `snapshot()`: ({state: count}, queue length)."""

    STATES = ("QUEUED", "RUNNING", "EXPORTING", "CANCELLING")

    def __init__(self, snapshot: Callable[[], tuple[dict[str, int], int]]):
        self.snapshot = snapshot

    def collect(self):
        jobs = GaugeMetricFamily(
            "lmforge_jobs", "Jobs not yet finished, by state.", labels=["state"]
        )
        queue = GaugeMetricFamily(
            "lmforge_training_queue_length", "Training tasks waiting in the Celery queue."
        )
        try:
            by_state, queued_tasks = self.snapshot()
        except Exception as e:  # a scrape while Redis is down shows no job metrics
            log.warning("job metrics unavailable: %s", e)
            return
        for state in self.STATES:
            jobs.add_metric([state], by_state.get(state, 0))
        queue.add_metric([], queued_tasks)
        yield from (jobs, queue)


# ---------------------------------------------------------------- worker


def observe_training(
    job_id: str, *, step: int, tokens_per_second: float, tokens_per_step: int,
    flops_per_token: int, peak_flops: float,
) -> None:  # fmt: skip
    """Records a running job's speed from one progress snapshot."""
    TRAINING_STEP.labels(job_id).set(step)
    TRAINING_TOKENS_PER_SECOND.labels(job_id).set(tokens_per_second)
    if tokens_per_second > 0 and tokens_per_step > 0:
        TRAINING_STEP_SECONDS.labels(job_id).set(tokens_per_step / tokens_per_second)
    flops = tokens_per_second * flops_per_token
    TRAINING_FLOPS.labels(job_id).set(flops)
    if peak_flops > 0:
        TRAINING_MFU.labels(job_id).set(flops / peak_flops)


def forget_job(job_id: str) -> None:
    """Drops a finished job's gauges so they do not linger at their last value."""
    for gauge in (
        TRAINING_STEP,
        TRAINING_TOKENS_PER_SECOND,
        TRAINING_STEP_SECONDS,
        TRAINING_FLOPS,
        TRAINING_MFU,
    ):
        try:
            gauge.remove(job_id)
        except KeyError:
            pass
