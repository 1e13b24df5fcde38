"""The SDK (sync and async) and CLI expose n, request_id, abort, context_shift and variant,
through a real inference server on loopback (tiny models from test_inference_server)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import pytest
from test_inference_server import DecodeGate, ServerThread, models, settings  # noqa: F401

from lmforge import Client, FinishReason, InvalidArgumentError
from lmforge.aio import AsyncClient
from lmforge.cli import main
from lmforge_server.inference.resolver import DirectoryResolver


@pytest.fixture(scope="module")
def server(models):  # noqa: F811
    s = ServerThread(settings(), DirectoryResolver(models))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def addr(server):
    return server.address


@contextlib.contextmanager
def held(server, client):
    """The "cyc" model's forward passes held after its first few: a stream started inside
    is certainly still running when the test aborts it (open the gate after the abort)."""
    client.generate("cyc", "a", max_tokens=1)  # loaded, so the gate can wrap it
    with DecodeGate(server, "cyc", allow=8) as gate:
        yield gate


@pytest.fixture(scope="module")
def client(addr):
    with Client(inference_addr=addr) as c:
        yield c


def test_n_samples_and_request_id_come_back_in_choices(client):
    alone = client.generate("char", "ROMEO:", max_tokens=8, temperature=0)
    done = client.generate(
        "char", "ROMEO:", max_tokens=8, temperature=0, n=3, request_id="sdk-n", variant="fp32"
    )
    assert done.request_id == "sdk-n"
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert all(c.token_ids == alone.token_ids for c in done.choices)  # greedy: all alike
    assert all(c.completion_tokens == 8 for c in done.choices)
    chunks = list(client.stream("char", "ROMEO:", max_tokens=4, n=2, request_id="sdk-s", seed=3))
    assert {c.index for c in chunks} == {0, 1}
    assert {c.request_id for c in chunks} == {"sdk-s"}
    assert sum(c.final for c in chunks) == 2


def test_variant_is_named_and_reported(client):
    assert client.models.info("char", variant="fp32").variant == "fp32"
    with pytest.raises(InvalidArgumentError, match="variant"):
        client.generate("char", "ROMEO:", max_tokens=2, variant="int3")


def test_context_shift_keeps_generating_past_the_context(client):
    # The char model's context is 96: 150 new tokens only fit by shifting the window.
    done = client.generate("char", "ROMEO:", max_tokens=150, temperature=0, context_shift=True)
    assert done.usage.completion_tokens == 150 and done.context_shifts >= 1
    assert done.finish_reason == FinishReason.LENGTH


def test_abort_ends_a_stream_started_with_its_request_id(server, client):
    with held(server, client) as gate:
        stream = client.stream("cyc", "a", max_tokens=3000, temperature=0, request_id="sdk-abort")
        with stream:
            first = next(iter(stream))
            assert first.request_id == "sdk-abort"
            assert client.abort("sdk-abort") is True
            gate.open()
            last = [d for d in stream][-1]
    assert last.final and last.finish_reason == FinishReason.CANCELLED
    assert last.usage.completion_tokens < 3000
    assert client.abort("sdk-abort") is False  # nothing of that id runs any more
    with pytest.raises(ValueError, match="request_id"):
        client.abort("")


def test_async_client_has_the_same_inference_surface(server, client, addr):
    async def main_(gate):
        async with AsyncClient(inference_addr=addr) as c:
            done = await c.generate(
                "char", "JULIET:", max_tokens=5, temperature=0, n=2, request_id="aio-n"
            )
            info = await c.models.info("char", variant="fp32")
            stream = c.stream("cyc", "a", max_tokens=3000, temperature=0, request_id="aio-abort")
            deltas = []
            async with stream:
                async for d in stream:
                    deltas.append(d)
                    if len(deltas) == 1:
                        assert await c.abort("aio-abort") is True
                        gate.open()
            return done, info, deltas

    with held(server, client) as gate:
        done, info, deltas = asyncio.run(main_(gate))
    assert done.request_id == "aio-n" and len(done.choices) == 2
    assert info.variant == "fp32"
    assert deltas[-1].finish_reason == FinishReason.CANCELLED


def run_cli(addr, *argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        with pytest.raises(SystemExit) as e:
            main(["--inference", addr, *argv])
    return e.value.code, out.getvalue()


def test_cli_generate_takes_n_request_id_variant_and_context_shift(addr, client):
    code, out = run_cli(
        addr, "generate", "char", "ROMEO:", "--temperature", "0", "--max-tokens", "120",
        "--n", "2", "--request-id", "cli-1", "--variant", "fp32", "--context-shift",
        "--no-stream", "--json",
    )  # fmt: skip
    assert code == 0
    done = json.loads(out)
    assert done["request_id"] == "cli-1" and len(done["choices"]) == 2
    assert done["context_shifts"] >= 1
    assert [c["completion_tokens"] for c in done["choices"]] == [120, 120]
    alone = client.generate("char", "ROMEO:", max_tokens=120, temperature=0, context_shift=True)
    assert done["choices"][0]["token_ids"] == alone.token_ids


def test_cli_abort_ends_a_running_generation(addr, client):
    stream = client.stream("cyc", "a", max_tokens=3000, temperature=0, request_id="cli-abort")
    with stream:
        next(iter(stream))
        code, out = run_cli(addr, "abort", "cli-abort")
        last = [d for d in stream][-1]
    assert code == 0 and out.strip() == "aborted"
    assert last.finish_reason == FinishReason.CANCELLED
    assert run_cli(addr, "abort", "cli-abort")[1].strip().startswith("no generation")
