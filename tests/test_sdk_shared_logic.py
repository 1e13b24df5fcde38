"""The SDK's no-I/O logic that Client and AsyncClient share (retry attempts, watch resume,
stream restarts, page cursor), checked directly: a fix there lands in both clients."""

from __future__ import annotations

import grpc
import pytest

from lmforge import errors
from lmforge._paging import PageCursor
from lmforge._retry import Attempts, Deadline, RetryPolicy
from lmforge._streaming import StreamState
from lmforge._watch import WatchResume
from lmforge.types import Page
from lmforge.v1 import inference_pb2, training_pb2

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)


class Status(grpc.RpcError):
    """A failed call's status, as grpc raises it."""

    def __init__(self, code: grpc.StatusCode, details: str = "x"):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_attempts_back_off_on_unavailable_until_the_retries_are_spent():
    attempts = Attempts(FAST, timeout=10)
    assert 0 < attempts.backoff(Status(grpc.StatusCode.UNAVAILABLE)) <= 0.01
    assert 0 < attempts.backoff(Status(grpc.StatusCode.UNAVAILABLE)) <= 0.02
    with pytest.raises(errors.UnavailableError):
        attempts.backoff(Status(grpc.StatusCode.UNAVAILABLE))


def test_attempts_never_retry_an_answer_or_past_the_deadline():
    with pytest.raises(errors.NotFoundError):
        Attempts(FAST, timeout=10).backoff(Status(grpc.StatusCode.NOT_FOUND))
    with pytest.raises(errors.UnavailableError):
        Attempts(FAST, timeout=0.001).backoff(Status(grpc.StatusCode.UNAVAILABLE))


def _event(event_id: str, terminal=False) -> training_pb2.JobEvent:
    return training_pb2.JobEvent(id=event_id, job_id="job_1", terminal=terminal)


def test_watch_resumes_after_the_last_event_given_out():
    resume = WatchResume("job_1", "5-0", None, 60, FAST)
    assert resume.request().after_event_id == "5-0"
    assert resume.received(_event("6-0")).id == "6-0"
    assert resume.request() == training_pb2.WatchJobRequest(id="job_1", after_event_id="6-0")
    assert resume.backoff(Status(grpc.StatusCode.UNAVAILABLE)) > 0
    assert resume.backoff(None) > 0  # ended early: resumed too


def test_watch_gives_up_on_answers_and_after_reconnecting_too_long():
    with pytest.raises(errors.PermissionDeniedError):
        WatchResume("job_1", "", None, 60, FAST).backoff(Status(grpc.StatusCode.PERMISSION_DENIED))
    resume = WatchResume("job_1", "", None, reconnect_timeout=0.0, policy=FAST)
    with pytest.raises(errors.UnavailableError, match="ended before the job did"):
        resume.backoff(None)


def test_a_stream_restarts_only_before_its_first_delta():
    state = StreamState(Deadline(10), FAST)
    assert state.restart_delay(Status(grpc.StatusCode.UNAVAILABLE)) > 0
    chunk = state.accept(inference_pb2.GenerateStreamResponse(text="ab"))
    assert chunk.text == "ab" and state.final is None
    with pytest.raises(errors.UnavailableError):
        state.restart_delay(Status(grpc.StatusCode.UNAVAILABLE))
    assert state.closed
    state.accept(inference_pb2.GenerateStreamResponse(text="c", final=True))
    assert state.text == "abc" and state.final.text == "c"


def test_page_cursor_follows_tokens_to_the_end():
    cursor = PageCursor()
    assert (cursor.token, cursor.done) == ("", False)
    cursor.advance(Page(items=[1], next_page_token="t2"))
    assert (cursor.token, cursor.done) == ("t2", False)
    cursor.advance(Page(items=[2], next_page_token=""))
    assert cursor.done


def test_several_addresses_are_one_target_balanced_round_robin():
    from lmforge._connection import CHANNEL_OPTIONS, ConnectionConfig, channel_target

    balanced = ("grpc.lb_policy_name", "round_robin")
    assert channel_target("10.0.0.1:50051") == ("10.0.0.1:50051", CHANNEL_OPTIONS)
    target, options = channel_target("10.0.0.1:50051, 10.0.0.2:50051")
    assert target == "ipv4:10.0.0.1:50051,10.0.0.2:50051" and balanced in options
    assert channel_target("[::1]:1,[::1]:2")[0] == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("localhost:1,127.0.0.1:2")[0] == "ipv4:127.0.0.1:1,127.0.0.1:2"
    target, options = channel_target("dns:///lmforge-inference-headless:50052")
    assert target == "dns:///lmforge-inference-headless:50052" and balanced in options
    with pytest.raises(ValueError, match="dns:///name:port"):
        channel_target("api-1:50051,api-2:50051")
    # Sync and async clients take a list or one string with commas alike.
    config = ConnectionConfig.resolve(api_addr=["10.0.0.1:1", "10.0.0.2:1"], env={})
    assert config.api_addr == "10.0.0.1:1,10.0.0.2:1"
