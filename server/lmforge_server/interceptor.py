"""One server interceptor per gRPC server: authentication, scopes and exception -> status.

Every RPC of a server passes through `ServiceInterceptor`:
- the API key is checked (UNAUTHENTICATED) and the method's scope (PERMISSION_DENIED
  naming it); the caller's principal is then available to servicers as `caller()`;
- request bytes that are not a valid message are INVALID_ARGUMENT, for every RPC;
- typed errors (lmforge_server.errors) become their status; Redis errors become
  UNAVAILABLE with no internal detail; anything else is INTERNAL with an opaque error id
  that is also logged with its traceback.
Health and reflection pass through untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import secrets
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import redis

from lmforge_server import errors
from lmforge_server.auth import Keyring, Principal

log = logging.getLogger("lmforge.rpc")

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
MAX_DETAILS = 1000

_caller: contextvars.ContextVar[Principal] = contextvars.ContextVar("lmforge_caller")


def caller() -> Principal:
    """The authenticated principal of the RPC being served."""
    return _caller.get()


def scope_for(method: str) -> str:
    """The scope an RPC needs: `infer` to generate, `read` to look, `train` to change."""
    service, _, name = method.rpartition("/")
    if service.endswith(".InferenceService"):
        return "infer"
    if name.startswith(("Get", "List", "Watch", "Download")):
        return "read"
    return "train"


class _Undecodable:
    """A request whose bytes did not parse: answered INVALID_ARGUMENT by the wrapper."""

    def __init__(self, error: Exception):
        self.error = error


def _safe_deserializer(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError, bad UTF-8 in a string field, ...
            return _Undecodable(e)

    return parse


def _check_decoded(request) -> None:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument("request: not a valid protobuf message for this method")


async def _checked_stream(requests):
    async for request in requests:
        _check_decoded(request)
        yield request


class OwnerLimit:
    """At most `limit` calls in flight per tenant for the methods whose names start with
    `prefix` (e.g. concurrent generation streams); `setting` names the limit."""

    def __init__(self, prefix: str, limit: int, setting: str):
        self.prefix, self.limit, self.setting = prefix, limit, setting
        self.open: Counter[str] = Counter()

    def applies(self, method: str) -> bool:
        return method.rpartition("/")[2].startswith(self.prefix)

    @contextlib.contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        if self.open[tenant] >= self.limit:
            raise errors.ResourceExhausted(
                f"{self.open[tenant]} {self.prefix} calls in flight; the limit per owner is"
                f" {self.limit} ({self.setting})"
            )
        self.open[tenant] += 1
        try:
            yield
        finally:
            self.open[tenant] -= 1
            if not self.open[tenant]:
                del self.open[tenant]


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Auth, scopes and the exception -> status mapping for one server.

    `statuses` adds (exception type, status) pairs for core errors that are not
    lmforge_server.errors subclasses (checked before the generic ones).
    """

    def __init__(
        self,
        keyring: Keyring,
        statuses: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (),
        per_owner: OwnerLimit | None = None,
    ):
        self.keyring = keyring
        self.statuses = statuses
        self.per_owner = per_owner

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = details.invocation_metadata
        scope = scope_for(method)
        if handler.request_streaming and handler.response_streaming:
            return handler  # no bidi RPCs today; refuse to guess how to wrap one
        wrap = self._wrap_stream if handler.response_streaming else self._wrap_unary
        behavior = handler.unary_stream or handler.unary_unary or handler.stream_unary
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        limit = self.per_owner if self.per_owner and self.per_owner.applies(method) else None
        return factory(
            wrap(behavior, metadata, scope, method, handler.request_streaming, limit),
            request_deserializer=_safe_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _enter(self, metadata, scope: str, request, streaming: bool):
        principal = self.keyring.authenticate(metadata)
        if scope not in principal.scopes:
            raise errors.PermissionDenied(
                f"this API key lacks the {scope!r} scope (it has {sorted(principal.scopes)})"
            )
        _caller.set(principal)
        if streaming:
            return _checked_stream(request)
        _check_decoded(request)
        return request

    def _wrap_unary(self, behavior, metadata, scope, method, streaming, limit):
        async def unary(request, context):
            try:
                request = self._enter(metadata, scope, request, streaming)
                with limit.slot(caller().tenant) if limit else contextlib.nullcontext():
                    return await behavior(request, context)
            except Exception as e:
                await self._abort(context, e, method)

        return unary

    def _wrap_stream(self, behavior, metadata, scope, method, streaming, limit):
        async def stream(request, context):
            try:
                request = self._enter(metadata, scope, request, streaming)
                with limit.slot(caller().tenant) if limit else contextlib.nullcontext():
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        async for message in result:
                            yield message
                    else:
                        await result
            except Exception as e:
                await self._abort(context, e, method)

        return stream

    async def _abort(self, context, e: Exception, method: str) -> None:
        if isinstance(e, grpc.aio.AbortError):
            raise e
        code, message = self.status_of(e)
        if code == grpc.StatusCode.INTERNAL:
            error_id = f"err_{secrets.token_hex(6)}"
            log.error("%s failed (error id %s)", method, error_id, exc_info=e)
            message = f"internal error (id {error_id}); the server logged the details"
        elif code == grpc.StatusCode.UNAVAILABLE and not isinstance(e, errors.ServiceError):
            log.warning("%s: store unavailable: %s", method, e)
        if len(message) > MAX_DETAILS:
            message = message[: MAX_DETAILS - 3] + "..."
        await context.abort(code, message)

    def status_of(self, e: Exception) -> tuple[grpc.StatusCode, str]:
        for kind, code in self.statuses:
            if isinstance(e, kind):
                return code, str(e)
        if isinstance(e, errors.ServiceError):
            return grpc.StatusCode[e.code], e.message
        if isinstance(e, redis.RedisError):
            return grpc.StatusCode.UNAVAILABLE, "the job store is unavailable; retry shortly"
        return grpc.StatusCode.INTERNAL, ""
