"""The logic of a generation stream, shared by `CompletionStream` and
`AsyncCompletionStream`: what was received, the final delta, and whether a failed stream
may start again. No I/O."""

from __future__ import annotations

import grpc

from lmforge import _convert, errors
from lmforge._retry import Deadline, RetryPolicy
from lmforge.types import CompletionChunk
from lmforge.v1 import inference_pb2


class StreamState:
    def __init__(self, deadline: Deadline, retry: RetryPolicy):
        self.deadline = deadline
        self._delays = retry.delays()
        self.received = False
        self.closed = False
        self.parts: list[str] = []
        self.final: CompletionChunk | None = None

    def accept(self, msg: inference_pb2.GenerateStreamResponse) -> CompletionChunk:
        """A message arrived: the chunk to hand out."""
        self.received = True
        chunk = _convert.completion_chunk(msg)
        self.parts.append(chunk.text)
        if chunk.final:
            self.final = chunk
        return chunk

    def restart_delay(self, error: grpc.RpcError) -> float:
        """The sleep before starting the stream again after `error`, or raises the SDK's
        error: only a stream that produced nothing yet is started again (repeating nothing)."""
        delay = next(self._delays, None) if RetryPolicy.retryable(error) else None
        if self.received or delay is None or not self.deadline.allows(delay):
            self.closed = True
            raise errors.from_rpc_error(error) from error
        return delay

    @property
    def text(self) -> str:
        return "".join(self.parts)
