"""Errors as HTTP answers: gRPC statuses to HTTP statuses, in OpenAI's error JSON shape
(`{"error": {"message", "type", "param", "code"}}`), which the console reads too."""

from __future__ import annotations

import re

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse

# gRPC status -> (HTTP status, OpenAI error type).
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
# "field: message" or "field.sub: message", as the servers word INVALID_ARGUMENT.
_FIELD = re.compile(r"^([a-z_][a-z0-9_.]*): ")


class HTTPError(Exception):
    """A client error the gateway finds itself (bad JSON, an unsupported option)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or {400: "invalid_request", 404: "not_found"}.get(status)


async def json_body(request: Request) -> dict:
    """The request's JSON object, or a 400 saying what is wrong with it."""
    try:
        body = await request.json()
    except ValueError:
        raise HTTPError(400, "the body must be a JSON object; it does not parse") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return body


def error_body(status: int, message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, type_, param, code), status_code=status)


def from_http_error(e: HTTPError) -> JSONResponse:
    type_ = "invalid_request_error" if e.status < 500 else "server_error"
    if e.status == 404:
        type_ = "not_found_error"
    return error_response(e.status, e.message, type_, e.param, e.code)


def rpc_status(e: grpc.aio.AioRpcError) -> tuple[int, dict]:
    """The HTTP status and error body for a failed gRPC call."""
    status, type_ = _HTTP.get(e.code(), (500, "server_error"))
    message = e.details() or e.code().name
    match = _FIELD.match(message)
    param = match.group(1) if match and status == 400 else None
    return status, error_body(status, message, type_, param, e.code().name.lower())


def from_rpc_error(e: grpc.aio.AioRpcError) -> JSONResponse:
    status, body = rpc_status(e)
    return JSONResponse(body, status_code=status)
