"""The service's typed errors: core code raises these, the server interceptor turns them
into gRPC statuses (lmforge_server.interceptor). They know nothing of gRPC themselves.

Every message names the field or the limit a client can act on, and never reveals server
paths or internals.
"""

from __future__ import annotations

# Longest client-supplied value echoed back in a message: a 16 KB id must not make the
# reply exceed a default client's metadata limit.
MAX_ECHO = 80


def shown(value: object) -> str:
    """`repr(value)`, cut to MAX_ECHO characters, for error messages."""
    text = repr(value)
    return text if len(text) <= MAX_ECHO else f"{text[: MAX_ECHO - 5]}...{text[-1]}"


class ServiceError(Exception):
    """A failure the client caused or can act on; `code` is the gRPC status name."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"
