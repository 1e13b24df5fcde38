"""`lmforge serve inference`: the grpc.aio server around the inference Engine.

Serves InferenceService, the standard health service (SERVING only once the engine is
up) and server reflection; SIGINT/SIGTERM stop it gracefully (health goes NOT_SERVING,
streams in flight get a grace period, then the schedulers stop).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lmforge.v1 import inference_pb2, inference_pb2_grpc
from lmforge_server import metrics, transport
from lmforge_server.inference.engine import Engine
from lmforge_server.inference.resolver import DirectoryResolver, ModelResolver
from lmforge_server.inference.service import _STATUS as ENGINE_STATUSES
from lmforge_server.inference.service import InferenceService
from lmforge_server.interceptor import OwnerLimit, ServiceInterceptor
from lmforge_server.lifecycle import run_until_signalled
from lmforge_server.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
GRACE_S = 5.0


def default_resolver(settings: Settings) -> ModelResolver:
    """The model registry in Redis (models from the artifact store) when one is configured,
    else <artifacts>/models/<id>/."""
    if settings.redis_url:
        from lmforge_server.artifacts import ArtifactStore
        from lmforge_server.inference.resolver import StoredResolver
        from lmforge_server.store import Store

        return StoredResolver(
            Store.from_url(settings.redis_url), ArtifactStore.from_settings(settings)
        )
    return DirectoryResolver(settings.artifacts_dir / "models")


class InferenceServer:
    """The server and its engine; `start` returns the address it listens on."""

    def __init__(self, settings: Settings, resolver: ModelResolver | None = None, **engine_kw):
        self.settings = settings
        keyring = transport.keyring_or_exit(settings, settings.inference_addr)
        self.engine = Engine(settings, resolver or default_resolver(settings), **engine_kw)
        self.server = grpc.aio.server(
            interceptors=[
                metrics.MetricsInterceptor("inference"),
                ServiceInterceptor(
                    keyring,
                    statuses=tuple(ENGINE_STATUSES),
                    per_owner=OwnerLimit(
                        "Generate", settings.max_generations_per_owner, "max_generations_per_owner"
                    ),
                ),
            ],
            options=[
                ("grpc.max_receive_message_length", 8 << 20),
                # A port in use is an error, not a port shared with another server.
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceService(self.engine, settings), self.server
        )
        # The health servicer starts with "" SERVING; it says so only once `start` is done.
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.address = ""
        self.metrics: metrics.Endpoint | None = None

    async def start(self) -> str:
        host, _, _ = self.settings.inference_addr.rpartition(":")
        port = transport.listen(self.server, self.settings, self.settings.inference_addr)
        self.address = f"{host}:{port}"
        self.metrics = metrics.serve_metrics(
            self.settings.inference_metrics_addr, metrics.EngineCollector(self._engine_load)
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("inference server listening on %s (%s)", self.address, self.engine.providers[0])
        return self.address

    def _engine_load(self) -> list[tuple[str, int, int]]:
        return [(k, v["queued"], v["active"]) for k, v in self.engine.stats().items()]

    async def stop(self, grace: float = GRACE_S) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.engine.close()
        if self.metrics is not None:
            self.metrics.close()


async def serve(
    settings: Settings,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    resolver: ModelResolver | None = None,
) -> None:
    """Serves until `stop` is set (or forever); sets `ready` once SERVING."""
    server = InferenceServer(settings, resolver)
    await server.start()
    if ready is not None:
        ready.set()
    try:
        if stop is None:
            await server.server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        await server.stop()


def run(settings: Settings) -> None:
    """`lmforge serve inference`: serves until SIGINT/SIGTERM, then stops gracefully."""
    run_until_signalled(lambda stop: serve(settings, stop=stop))
