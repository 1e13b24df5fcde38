"""One small exception hierarchy for everything the SDK raises.

Every error the server returns becomes an `APIError` subclass chosen by its gRPC status
code, carrying the code (`.code`, a `grpc.StatusCode`) and the server's message
(`.message`). Errors that are not a server's answer (a job that ended badly, a wait that
ran out of time) derive from `LmforgeError` too, so `except lmforge.LmforgeError` catches
all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from lmforge.types import Job

__all__ = [
    "LmforgeError",
    "APIError",
    "InvalidArgumentError",
    "NotFoundError",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "PermissionDeniedError",
    "UnavailableError",
    "DeadlineExceededError",
    "CancelledError",
    "InternalError",
    "UnimplementedError",
    "JobFailedError",
    "WaitTimeoutError",
]


class LmforgeError(Exception):
    """The base of every exception the SDK raises."""


class APIError(LmforgeError):
    """The server (or the transport to it) answered a call with a non-OK gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.message} ({self.code.name})"


class InvalidArgumentError(APIError, ValueError):
    """A request field is out of range; the message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(APIError, LookupError):
    """The dataset, job or model does not exist (or belongs to another tenant)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(APIError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(APIError):
    """The call is valid but not now, e.g. generating from a model still training."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(APIError):
    """A limit was hit: the queue is full, an upload or a message is too large."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(APIError):
    """No API key, or one the server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(APIError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(APIError, ConnectionError):
    """The server could not be reached (after the retries idempotent calls get)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(APIError, TimeoutError):
    """The call's timeout passed before the server answered."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(APIError):
    code = grpc.StatusCode.CANCELLED


class InternalError(APIError):
    """The server hit a bug; the message says what it knows."""

    code = grpc.StatusCode.INTERNAL


class UnimplementedError(APIError):
    code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[APIError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        InternalError,
        UnimplementedError,
    )
}
# Codes without a class of their own that mean the same to a caller.
_BY_CODE[grpc.StatusCode.OUT_OF_RANGE] = InvalidArgumentError
_BY_CODE[grpc.StatusCode.DATA_LOSS] = InternalError


def from_rpc_error(error: grpc.RpcError) -> APIError:
    """The SDK exception for a failed gRPC call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else None
    message = details or (code.name.lower().replace("_", " ") if code else str(error))
    cls = _BY_CODE.get(code, APIError)
    return cls(message, code=code)


class JobFailedError(LmforgeError):
    """A job the caller waited for ended FAILED or CANCELLED; `.job` is its final record."""

    def __init__(self, job: Job):
        state = job.state.lower()
        detail = f": {job.error}" if job.error else ""
        super().__init__(f"job {job.id} {state}{detail}")
        self.job = job


class WaitTimeoutError(LmforgeError, TimeoutError):
    """`jobs.wait` ran out of time before the job finished; the job keeps running."""

    def __init__(self, job_id: str, timeout: float):
        super().__init__(f"job {job_id} did not finish within {timeout:g}s")
        self.job_id = job_id
        self.timeout = timeout
