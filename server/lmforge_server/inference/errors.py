"""The errors an inference request can get; the servicer maps each to a gRPC status."""

from __future__ import annotations


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
