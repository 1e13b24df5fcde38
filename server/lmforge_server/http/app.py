"""The gateway's Starlette app and `lmforge serve http` (uvicorn).

Starlette on uvicorn: a small ASGI toolkit (routing, static files, streaming responses for
SSE, multipart forms) with no framework of its own to learn, on the asyncio server that
the grpc.aio channels share their event loop with.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from pathlib import Path

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lmforge_server import transport
from lmforge_server.http import console, openai_api
from lmforge_server.http.errors import HTTPError, error_response, from_http_error, from_rpc_error
from lmforge_server.http.upstream import Upstream
from lmforge_server.settings import Settings

log = logging.getLogger("lmforge.http")
STATIC = Path(__file__).parent / "static"

HTTP_REQUESTS = Counter(
    "lmforge_http_requests_total", "HTTP requests, by route and status.", ["route", "status"]
)
HTTP_LATENCY = Histogram(
    "lmforge_http_request_duration_seconds",
    "Time to the response's headers (streams go on after it).",
    ["route"],
)


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _rpc_error(request: Request, e: Exception) -> Response:
    return from_rpc_error(e)


async def _http_error(request: Request, e: Exception) -> Response:
    return from_http_error(e)


async def _bug(request: Request, e: Exception) -> Response:
    """A bug, never the client's input: a 500 with an id that is also in the log."""
    incident = uuid.uuid4().hex[:12]
    log.error("%s %s failed (incident %s)", request.method, request.url.path, incident,
              exc_info=e)  # fmt: skip
    return error_response(500, f"internal error (incident {incident})", "server_error")


async def _not_found(request: Request, e: Exception) -> Response:
    return error_response(
        404, f"no route for {request.method} {request.url.path}", "not_found_error"
    )


async def _method_not_allowed(request: Request, e: Exception) -> Response:
    return error_response(405, f"{request.method} is not allowed here", "invalid_request_error")


class _Metrics:
    """ASGI middleware: counts and times every request by its route template."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                HTTP_LATENCY.labels(_route(scope)).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            HTTP_REQUESTS.labels(_route(scope), str(status["code"])).inc()


def _route(scope) -> str:
    """The matched route's template (/v1/fine_tuning/jobs/{job_id}), never the raw path."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def build_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        app.state.upstream = Upstream(
            settings.api_addr, settings.inference_addr, transport.channel_credentials(settings)
        )
        app.state.max_upload_bytes = settings.max_upload_bytes
        try:
            yield
        finally:
            await app.state.upstream.close()

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        *console.routes,
        *openai_api.routes,
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/v1", lambda r: RedirectResponse("/v1/models")),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            grpc.aio.AioRpcError: _rpc_error,
            HTTPError: _http_error,
            404: _not_found,
            405: _method_not_allowed,
            Exception: _bug,
        },
    )
    app.add_middleware(_Metrics)
    return app


def run(settings: Settings) -> None:
    """`lmforge serve http`: serves the gateway on settings.http_addr until SIGINT/SIGTERM."""
    import uvicorn

    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, _, port = settings.http_addr.rpartition(":")
    tls = transport.http_tls(settings)
    if not tls and not transport.is_loopback(settings.http_addr):
        log.warning("serving %s in plaintext: API keys cross the network in the clear",
                    settings.http_addr)  # fmt: skip
    log.info("console on %s://%s/ (api %s, inference %s)", "https" if tls else "http",
             settings.http_addr, settings.api_addr, settings.inference_addr)  # fmt: skip
    uvicorn.run(
        build_app(settings),
        **tls,
        host=host or "127.0.0.1",
        port=int(port),
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
