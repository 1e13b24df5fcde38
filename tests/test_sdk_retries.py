"""The SDK retries uploads, generate and streams on UNAVAILABLE, sync and async alike; its
connection arguments (and the CLI's flags) win over LMFORGE_* environment variables.

Stand-in gRPC servers that fail on purpose are what these tests are about (a real server
cannot be made to drop the first two calls); they listen on a port the kernel picks.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent import futures

import grpc
import pytest

from lmforge import AsyncClient, Client, RetryPolicy, UnavailableError
from lmforge.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

FAST = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.05)
DATA = b"".join(b"line %d of a corpus\n" % i for i in range(3000))  # ~60 kB: many chunks


class Flaky(training_pb2_grpc.DatasetServiceServicer, inference_pb2_grpc.InferenceServiceServicer):
    """Fails the first `failures` calls of each method with UNAVAILABLE, then answers.

    Uploads are read to the end before failing, so a retry has to send every byte again.
    Streams fail after `fail_after` messages (0: before the first).
    """

    def __init__(self, failures: int = 2, fail_after: int = 0):
        self.failures, self.fail_after = failures, fail_after
        self.calls: dict[str, int] = {}
        self.uploads: list[bytes] = []
        self.keys: list[str | None] = []

    def _attempt(self, name: str) -> int:
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.calls[name]

    def UploadDataset(self, request_iterator, context):
        attempt = self._attempt("upload")
        header, data = None, b""
        for req in request_iterator:
            if req.WhichOneof("part") == "header":
                header = req.header
            else:
                data += req.chunk
        self.uploads.append(data)
        if attempt <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        assert hashlib.sha256(data).hexdigest() == header.sha256
        return training_pb2.Dataset(id=header.sha256, sha256=header.sha256, size_bytes=len(data))

    def Generate(self, request, context):
        self.keys.append(dict(context.invocation_metadata()).get("authorization"))
        if self._attempt("generate") <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return inference_pb2.GenerateResponse(
            model_id="m", text="hello", token_ids=[1, 2], finish_reason=1
        )

    def GenerateStream(self, request, context):
        attempt = self._attempt("stream")
        for i, piece in enumerate(["he", "ll", "o"]):
            if attempt <= self.failures and i == self.fail_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            yield inference_pb2.GenerateStreamResponse(text=piece, token_ids=[i])
        yield inference_pb2.GenerateStreamResponse(
            final=True,
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=1, completion_tokens=3),
            model_id="m",
        )


@pytest.fixture
def flaky(request):
    servicer = Flaky(**getattr(request, "param", {}))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    training_pb2_grpc.add_DatasetServiceServicer_to_server(servicer, server)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def _sync(addr: str):
    with Client(api_addr=addr, inference_addr=addr, retry=FAST, timeout=30) as c:
        dataset = c.datasets.upload(DATA, chunk_size=4096)
        text = c.generate("m", "hi").text
        with c.stream("m", "hi") as s:
            streamed = [d.text for d in s]
        return dataset, text, streamed, s.final


def _async(addr: str):
    async def main():
        async with AsyncClient(api_addr=addr, inference_addr=addr, retry=FAST, timeout=30) as c:
            dataset = await c.datasets.upload(DATA, chunk_size=4096)
            text = (await c.generate("m", "hi")).text
            async with c.stream("m", "hi") as s:
                streamed = [d.text async for d in s]
            return dataset, text, streamed, s.final

    return asyncio.run(main())


@pytest.mark.parametrize("flavour", [_sync, _async], ids=["sync", "async"])
def test_uploads_generate_and_streams_are_retried_on_unavailable(flaky, flavour):
    servicer, addr = flaky
    dataset, text, streamed, final = flavour(addr)
    assert servicer.calls == {"upload": 3, "generate": 3, "stream": 3}
    # Each attempt sent the whole corpus from its first byte, header and all.
    assert servicer.uploads == [DATA] * 3
    assert dataset.id == hashlib.sha256(DATA).hexdigest() and dataset.size_bytes == len(DATA)
    assert text == "hello"
    assert "".join(streamed) == "hello" and final.usage.completion_tokens == 3


@pytest.mark.parametrize("flaky", [{"failures": 1, "fail_after": 1}], indirect=True)
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_stream_that_already_gave_text_is_not_restarted(flaky, flavour):
    servicer, addr = flaky
    seen: list[str] = []
    with pytest.raises(UnavailableError):
        if flavour == "sync":
            with Client(inference_addr=addr, retry=FAST) as c, c.stream("m", "hi") as s:
                seen.extend(d.text for d in s)
        else:

            async def main():
                async with AsyncClient(inference_addr=addr, retry=FAST) as c:
                    async with c.stream("m", "hi") as s:
                        async for d in s:
                            seen.append(d.text)

            asyncio.run(main())
    # Starting again would have repeated "he": the error is the caller's to handle.
    assert seen == ["he"] and servicer.calls == {"stream": 1}


@pytest.mark.parametrize("flaky", [{"failures": 1000}], indirect=True)
def test_the_clis_timeout_bounds_a_streamed_generation_and_its_restarts(flaky, capsys):
    from lmforge.cli import main

    servicer, addr = flaky
    try:
        code = main(["--inference", addr, "--timeout", "0.3", "generate", "m", "hi"])
    except SystemExit as e:
        code = e.code
    assert code == 1
    assert "Traceback" not in (err := capsys.readouterr().err) and "restarting" in err
    # The 0.3 s deadline ended the restarts, not the default policy's 5 tries.
    assert 1 <= servicer.calls["stream"] < 5


@pytest.mark.parametrize("flaky", [{"failures": 0}], indirect=True)
def test_arguments_win_over_the_environment(flaky, monkeypatch, capsys):
    import contextlib
    import json
    import socket

    from lmforge.cli import main

    servicer, addr = flaky
    with socket.socket() as held:  # bound, never listening: the environment's dead end
        held.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{held.getsockname()[1]}"
        for var, value in {
            "LMFORGE_API_ADDR": dead,
            "LMFORGE_INFERENCE_ADDR": dead,
            "LMFORGE_API_KEY": "from-env",
        }.items():
            monkeypatch.setenv(var, value)

        with Client() as c:  # nothing given: the environment applies
            assert (c.api_addr, c.inference_addr) == (dead, dead)
        with Client(api_addr=addr, inference_addr=addr, api_key="from-arg", retry=FAST) as c:
            assert (c.api_addr, c.inference_addr) == (addr, addr)
            assert c.generate("m", "hi").text == "hello"

        async def from_async():
            async with AsyncClient(inference_addr=addr, api_key="from-arg") as c:
                return (await c.generate("m", "hi")).text

        assert asyncio.run(from_async()) == "hello"

        with contextlib.suppress(SystemExit):
            main(
                [
                    "--inference",
                    addr,
                    "--api-key",
                    "from-flag",
                    "generate",
                    "m",
                    "hi",
                    "--no-stream",
                    "--json",
                ]
            )
        assert json.loads(capsys.readouterr().out)["text"] == "hello"
    assert servicer.keys == ["Bearer from-arg", "Bearer from-arg", "Bearer from-flag"]
