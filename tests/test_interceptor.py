"""The server interceptor's last resort, over a real grpc.aio server on loopback: an
exception nobody expected is INTERNAL with an opaque error id and nothing else, and the
same id is logged with the traceback so an operator can find it."""

from __future__ import annotations

import asyncio
import logging
import re

import grpc

from lmforge.v1 import training_pb2
from lmforge_server.auth import Keyring
from lmforge_server.interceptor import ServiceInterceptor

SECRET = "redis://10.0.0.7:6379 password=hunter2"


async def _fails(request, context):
    raise ZeroDivisionError(SECRET)


async def _fails_midstream(request, context):
    yield training_pb2.JobEvent(id="1-0")
    raise ZeroDivisionError(SECRET)


def test_an_unexpected_exception_is_internal_with_an_opaque_id_that_is_logged(caplog):
    handlers = {
        "GetJob": grpc.unary_unary_rpc_method_handler(
            _fails,
            request_deserializer=training_pb2.GetJobRequest.FromString,
            response_serializer=training_pb2.Job.SerializeToString,
        ),
        "WatchJob": grpc.unary_stream_rpc_method_handler(
            _fails_midstream,
            request_deserializer=training_pb2.WatchJobRequest.FromString,
            response_serializer=training_pb2.JobEvent.SerializeToString,
        ),
    }

    async def main():
        server = grpc.aio.server(interceptors=[ServiceInterceptor(Keyring({}))])
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("lmforge.v1.JobService", handlers),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                get = channel.unary_unary(
                    "/lmforge.v1.JobService/GetJob",
                    request_serializer=training_pb2.GetJobRequest.SerializeToString,
                    response_deserializer=training_pb2.Job.FromString,
                )
                watch = channel.unary_stream(
                    "/lmforge.v1.JobService/WatchJob",
                    request_serializer=training_pb2.WatchJobRequest.SerializeToString,
                    response_deserializer=training_pb2.JobEvent.FromString,
                )
                errors = []
                try:
                    await get(training_pb2.GetJobRequest(id="job_1"), timeout=10)
                except grpc.aio.AioRpcError as e:
                    errors.append(e)
                events = []
                try:
                    async for ev in watch(training_pb2.WatchJobRequest(id="job_1"), timeout=10):
                        events.append(ev)
                except grpc.aio.AioRpcError as e:
                    errors.append(e)
                return errors, events
        finally:
            await server.stop(None)

    with caplog.at_level(logging.ERROR, logger="lmforge.rpc"):
        errors, events = asyncio.run(main())
    assert len(errors) == 2 and len(events) == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for e in errors:
        assert e.code() == grpc.StatusCode.INTERNAL
        m = re.fullmatch(
            r"internal error \(id (err_[0-9a-f]{12})\); the server logged the details", e.details()
        )
        assert m, e.details()
        assert "hunter2" not in e.details() and "ZeroDivision" not in e.details()
        assert m[1] in logged  # the operator finds the failure by the id the client saw
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 2
    assert all(isinstance(r.exc_info[1], ZeroDivisionError) for r in tracebacks)
