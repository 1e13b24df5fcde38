"""The retry policy: which failures are retried and how long to back off between tries.

Shared by the sync and async clients, which only differ in how they sleep.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from lmforge import errors


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for calls that are safe to repeat.

    Only UNAVAILABLE is retried (the server is not there yet, restarting, or the connection
    dropped): every other status is the server's answer and retrying would not change it.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.25
    max_backoff: float = 5.0
    multiplier: float = 2.0
    #: Each delay is drawn from [(1 - jitter) * backoff, backoff] so clients that lost the
    #: same server do not come back in lockstep.
    jitter: float = 0.5

    def delays(self, *, forever: bool = False) -> Iterator[float]:
        """The sleep before each retry: max_attempts - 1 of them, or endless with `forever`
        (for streams that resume, bounded by time instead)."""
        backoff, tries = self.initial_backoff, 1
        while forever or tries < self.max_attempts:
            yield backoff * (1.0 - self.jitter * random.random())
            backoff = min(self.max_backoff, backoff * self.multiplier)
            tries += 1

    @staticmethod
    def retryable(error: grpc.RpcError) -> bool:
        return _code(error) == grpc.StatusCode.UNAVAILABLE

    @staticmethod
    def resumable(error: grpc.RpcError) -> bool:
        """A server-streaming call that broke off this way can be resumed where it was: the
        server went away (UNAVAILABLE) or cancelled the call while shutting down (CANCELLED,
        which our own cancel never reaches, as it closes the stream first)."""
        return _code(error) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


NO_RETRY = RetryPolicy(max_attempts=1)


class Deadline:
    """An absolute deadline for a call and all of its retries (None: no deadline)."""

    def __init__(self, timeout: float | None):
        unbounded = timeout is None or math.isinf(timeout)
        self.at = None if unbounded else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left for the next try (at least a millisecond, so gRPC reports the expiry)."""
        return None if self.at is None else max(0.001, self.at - time.monotonic())

    def allows(self, delay: float) -> bool:
        """Whether sleeping `delay` still leaves time for another try."""
        return self.at is None or time.monotonic() + delay < self.at

    @property
    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


class Attempts:
    """The tries of one call that is safe to repeat: its deadline over all of them, and
    the backoff before the next. The sync and async clients only differ in how they sleep.

        attempts = Attempts(policy, timeout)
        while True:
            try:
                return call(timeout=attempts.remaining())
            except grpc.RpcError as e:
                sleep(attempts.backoff(e))
    """

    def __init__(self, policy: RetryPolicy, timeout: float | None):
        self.deadline = Deadline(timeout)
        self._delays = policy.delays()

    def remaining(self) -> float | None:
        return self.deadline.remaining()

    def backoff(self, error: grpc.RpcError) -> float:
        """The sleep before trying again; raises the SDK's error for `error` when it is not
        worth retrying, the retries are spent, or the deadline would pass."""
        delay = next(self._delays, None) if RetryPolicy.retryable(error) else None
        if delay is None or not self.deadline.allows(delay):
            raise errors.from_rpc_error(error) from error
        return delay
