"""`jobs.watch`'s resume logic, shared by the sync and async clients: the bookmark (the last
event given out), when a broken stream is resumed and how long to back off. No I/O."""

from __future__ import annotations

import time

import grpc

from lmforge import _convert, errors
from lmforge._retry import Deadline, RetryPolicy
from lmforge.types import JobEvent
from lmforge.v1 import training_pb2

#: How long `jobs.watch` keeps reconnecting to an API server that went away.
RECONNECT_TIMEOUT = 120.0


class WatchResume:
    """One watch over any number of WatchJob calls.

    resume = WatchResume(job_id, after_event_id, timeout, reconnect_timeout, policy)
    while True:
        call = stub.WatchJob(resume.request(), timeout=resume.remaining())
        try:
            for msg in call:
                event = resume.received(msg)
                yield event
                if event.terminal:
                    return
            error = None
        except grpc.RpcError as e:
            error = e
        sleep(resume.backoff(error))   # raises when the watch should end
    """

    def __init__(
        self,
        job_id: str,
        after_event_id: str,
        timeout: float | None,
        reconnect_timeout: float,
        policy: RetryPolicy,
    ):
        self.job_id, self.last = job_id, after_event_id
        self.deadline = Deadline(timeout)
        self.reconnect_timeout, self.policy = reconnect_timeout, policy
        self._failing_since: float | None = None
        self._delays = None

    def request(self) -> training_pb2.WatchJobRequest:
        """The next WatchJob request: after the last event given out."""
        return training_pb2.WatchJobRequest(id=self.job_id, after_event_id=self.last)

    def remaining(self) -> float | None:
        return self.deadline.remaining()

    def received(self, msg: training_pb2.JobEvent) -> JobEvent:
        """An event arrived: it is the new bookmark, and the stream is healthy again."""
        event = _convert.job_event(msg)
        self.last, self._failing_since, self._delays = event.id, None, None
        return event

    def backoff(self, error: grpc.RpcError | None) -> float:
        """The stream broke with `error` (None: it ended before the terminal event). Returns
        the sleep before resuming, or raises the SDK's error when the failure is not one to
        resume from, or reconnecting took too long, or the deadline would pass."""
        if error is not None and not RetryPolicy.resumable(error):
            raise errors.from_rpc_error(error) from error
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            self._delays = self.policy.delays(forever=True)
        delay = next(self._delays)
        too_long = time.monotonic() + delay - self._failing_since > self.reconnect_timeout
        if too_long or not self.deadline.allows(delay):
            if error is not None:
                raise errors.from_rpc_error(error) from error
            raise errors.UnavailableError("the job's event stream ended before the job did")
        return delay
