"""The gateway's gRPC side: one channel to each server, the caller's API key passed through.

The gateway holds no state and no key of its own: every call carries the HTTP request's
`Authorization` header as gRPC metadata, so the servers see the same tenant either way.
"""

from __future__ import annotations

import grpc
import grpc.aio
from google.protobuf import json_format
from starlette.requests import Request

from lmforge._connection import channel_target
from lmforge.v1 import inference_pb2_grpc, training_pb2_grpc

# Unary calls that take longer than this are a server in trouble, not a slow answer.
UNARY_TIMEOUT_S = 60.0


class Upstream:
    """Stubs of the four services on two channels, opened on the server's event loop."""

    def __init__(
        self,
        api_addr: str,
        inference_addr: str,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        """`credentials`: TLS to the servers (None: plaintext). Either address may name
        several replicas ("ip:port,ip:port" or "dns:///name:port"), balanced round robin."""
        self._api = _channel(api_addr, credentials)
        self._inference = _channel(inference_addr, credentials)
        self.datasets = training_pb2_grpc.DatasetServiceStub(self._api)
        self.jobs = training_pb2_grpc.JobServiceStub(self._api)
        self.models = training_pb2_grpc.ModelServiceStub(self._api)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._inference)

    async def close(self) -> None:
        await self._api.close()
        await self._inference.close()


def _channel(addr: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    target, options = channel_target(addr)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


def metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """The caller's credentials as gRPC metadata (nothing when it sent none)."""
    auth = request.headers.get("authorization")
    return (("authorization", auth),) if auth else ()


def to_dict(msg) -> dict:
    """A message as JSON-ready dict: proto field names, enums by name, unset scalars as 0."""
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
