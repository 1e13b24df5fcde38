"""The inference server end to end: real ONNX Runtime sessions behind a real grpc.aio server
on loopback, called through a real gRPC channel; tiny exported models."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from _tiny_models import build_cycle_model_dir, build_model_dir, load_torch, torch_greedy
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenizers import Tokenizer

from lmforge.v1 import inference_pb2, inference_pb2_grpc
from lmforge_server.inference.engine import Engine, InvalidArgument, ModelNotFound, ModelNotReady
from lmforge_server.inference.resolver import DirectoryResolver
from lmforge_server.inference.sampling import SamplingParams
from lmforge_server.inference.server import SERVICE_NAME, InferenceServer
from lmforge_server.settings import Settings

CYCLE = "añ€😀".encode()  # bytes of 4 characters of 1, 2, 3 and 4 bytes, all distinct
CYCLE_TEXT = CYCLE.decode()
PROMPTS = ["ROMEO:", "JULIET: O", "First Citizen:\nBefore we proceed", "A", "What, ho!"]


class ServerThread:
    """An InferenceServer on its own event loop in a background thread."""

    def __init__(self, settings: Settings, resolver):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._call(self._make(settings, resolver))
        self.address = self._call(self.server.start())

    async def _make(self, settings, resolver):
        return InferenceServer(settings, resolver)

    def _call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self) -> dict:
        return self.server.engine.stats()

    def stop(self):
        self._call(self.server.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_model_dir(root / "char", weight_scale=50.0, context_length=96)
    build_cycle_model_dir(root / "cyc", CYCLE, context_length=4096)
    shutil.copytree(root / "char", root / "training")
    (root / "training" / "metadata.json").write_text(json.dumps({"state": "TRAINING"}))
    shutil.copytree(root / "char", root / "theirs")
    (root / "theirs" / "metadata.json").write_text(json.dumps({"owner": "someone-else"}))
    return root


def settings(**overrides) -> Settings:
    base = dict(inference_device="cpu", inference_addr="127.0.0.1:0", max_prompt_chars=5000)
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="module")
def server(models):
    s = ServerThread(settings(), DirectoryResolver(models))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference(models):
    """PyTorch model and tokenizer of the `char` model: what the server must reproduce."""
    tok = Tokenizer.from_file(str(models / "char" / "tokenizer.json"))
    return load_torch(models / "char"), tok


def request(model="char", prompt="ROMEO:", **sampling):
    stop = sampling.pop("stop", ())
    truncate = sampling.pop("truncate_prompt", False)
    return inference_pb2.GenerateRequest(
        model=model,
        prompt=prompt,
        sampling=inference_pb2.SamplingParams(stop=stop, **sampling),
        truncate_prompt=truncate,
    )


def collect(stub, req, **kw):
    msgs = list(stub.GenerateStream(req, timeout=60, **kw))
    assert [m.final for m in msgs] == [False] * (len(msgs) - 1) + [True]
    ids = [t for m in msgs for t in m.token_ids]
    return "".join(m.text for m in msgs), ids, msgs


def wait_idle(server, model_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = server.server.engine.stats().get(model_id, {})
        if st.get("active") == 0 and st.get("queued") == 0:
            return st
        time.sleep(0.02)
    raise AssertionError(f"model {model_id} still busy: {st}")


def wait_until(predicate, what: str, timeout: float = 30.0) -> None:
    """Waits for `predicate()`; the timeout only stops a hang, it is no speed assertion."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def scheduler_of(server: ServerThread, model_id: str):
    """The scheduler of a loaded model (one per loaded model and variant)."""
    return next(v.scheduler for k, v in server.server.engine._loaded.items() if k[0] == model_id)


class DecodeGate:
    """Holds a loaded model's forward passes, after the first `allow` of them (enough for
    whole characters: a token may be one byte of one), until the
    test opens the gate: a generation is then certainly still running while the test
    cancels it, lets its deadline pass or evicts its model, instead of hoping that a long
    generation outlasts them."""

    def __init__(self, server: ServerThread, model_id: str, allow: int = 1):
        self.scheduler = scheduler_of(server, model_id)
        self.model, self.allow = self.scheduler.model, allow
        self.opened, self.holding = threading.Event(), threading.Event()

    def __enter__(self) -> DecodeGate:
        run = self.model.run

        def gated(*args, **kwargs):
            if self.allow > 0:
                self.allow -= 1
            else:
                self.holding.set()
                self.opened.wait()
            return run(*args, **kwargs)

        self.model.run = gated
        return self

    def stopped(self, cancelled_before: int) -> bool:
        """Whether the server has cancelled the request: marked in the held batch, or
        already dropped as cancelled before it reached the gate."""
        rows = list(self.scheduler._rows)
        if rows and all(r.cancelled for r in rows):
            return True
        return self.scheduler.finished.get("cancelled", 0) > cancelled_before

    def open(self) -> None:
        self.opened.set()

    def __exit__(self, *exc) -> None:
        self.opened.set()
        del self.model.run  # the class's own method again


# --- results ------------------------------------------------------------------------------


def test_greedy_stream_equals_pytorch_greedy_token_for_token(stub, reference):
    model, tok = reference
    for prompt in PROMPTS[:3]:
        ids = tok.encode(prompt).ids
        eos = tok.get_vocab_size() - 1
        expected = torch_greedy(model, ids, 40, eos=eos)
        text, got, msgs = collect(stub, request(prompt=prompt, max_new_tokens=40, temperature=0))
        assert got == expected
        assert text == tok.decode([t for t in expected if t != eos])
        final = msgs[-1]
        assert final.usage.prompt_tokens == len(ids)
        assert final.usage.completion_tokens == len(expected)
        assert final.model_id == "char"
        assert final.timings.total_ms >= final.timings.time_to_first_token_ms > 0


def test_unary_generate_equals_the_stream(stub):
    req = request(prompt="JULIET: O", max_new_tokens=25, temperature=0, logprobs=True)
    text, ids, _ = collect(stub, req)
    resp = stub.Generate(req, timeout=60)
    assert (resp.text, list(resp.token_ids)) == (text, ids)
    assert len(resp.logprobs) == len(ids) and all(lp <= 0 for lp in resp.logprobs)
    assert resp.finish_reason == inference_pb2.FINISH_REASON_LENGTH


def test_seeded_sampling_is_reproducible(stub):
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.1)
    a = collect(stub, request(seed=1234, **kw))[:2]
    b = collect(stub, request(seed=1234, **kw))[:2]
    c = collect(stub, request(seed=4321, **kw))[:2]
    assert a == b
    assert a != c


def test_stop_sequence_across_token_boundaries_is_cut_exactly(stub):
    # The cycle model emits "ñ€😀a" forever after "a", one byte per token.
    for stop, expected in [("😀a", "ñ€"), ("€😀añ", "ñ"), ("añ€😀añ", "ñ€😀")]:
        text, ids, msgs = collect(
            stub, request("cyc", "a", temperature=0, max_new_tokens=60, stop=[stop])
        )
        assert text == expected
        assert msgs[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
        assert stop not in "".join(m.text for m in msgs)


def test_multibyte_characters_split_across_byte_tokens_stream_whole(stub):
    text, ids, msgs = collect(stub, request("cyc", "a", temperature=0, max_new_tokens=47))
    # 47 bytes: four whole cycles (40 bytes), then "ñ€" (5), then 2 of the emoji's 4 bytes.
    assert text == (CYCLE_TEXT[1:] + "a") * 4 + "ñ€"
    assert len(ids) == 47
    for m in msgs:
        assert "\ufffd" not in m.text
        m.text.encode("utf-8")
    assert {m.text for m in msgs[:-1]} <= set(CYCLE_TEXT)  # one whole character per delta


def test_max_new_tokens_ends_with_finish_reason_length(stub):
    _, ids, msgs = collect(stub, request(max_new_tokens=7, temperature=0))
    assert len(ids) == 7 and msgs[-1].usage.completion_tokens == 7
    assert msgs[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH


def test_generation_past_the_context_is_refused_naming_both_limits(stub, reference):
    _, tok = reference
    prompt = ("To be, or not to be: that is the question: " * 3)[:90]  # 90 of 96 positions
    assert len(tok.encode(prompt).ids) == 90
    with pytest.raises(grpc.RpcError) as e:
        collect(stub, request(prompt=prompt, max_new_tokens=50, temperature=0))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details()
    assert details.startswith("sampling.max_new_tokens") and "50" in details
    assert "90" in details and "context length 96" in details and "context_shift" in details
    # Unset, max_new_tokens defaults to what the context leaves.
    _, ids, msgs = collect(stub, request(prompt=prompt, temperature=0))
    assert len(ids) == 6
    assert msgs[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH


def test_prompt_longer_than_the_context_is_rejected_unless_truncated(stub):
    prompt = "abcdefghij" * 12  # 120 tokens > 95
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request(prompt=prompt, max_new_tokens=5), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in e.value.details() and "95" in e.value.details()
    # truncate_prompt fits the request in the context: the last 95 tokens, then what is left.
    resp = stub.Generate(request(prompt=prompt, max_new_tokens=5, truncate_prompt=True))
    assert resp.usage.prompt_tokens == 95 and resp.usage.completion_tokens == 1


# --- errors -------------------------------------------------------------------------------


def test_prompt_with_characters_outside_a_char_vocabulary_is_rejected_naming_them(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request(prompt="ROMEO: 日本", max_new_tokens=5), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in e.value.details() and "日本" in e.value.details()


def test_unknown_model_is_not_found(stub):
    for model in ("no-such-model", "theirs", "../char"):
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request(model=model), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, model


def test_model_still_training_is_failed_precondition(stub):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GenerateStream(request(model="training"), timeout=30))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "training" in e.value.details()


@pytest.mark.parametrize(
    ("field", "sampling", "limit"),
    [
        ("sampling.temperature", dict(temperature=-0.5), ">= 0"),
        ("sampling.top_p", dict(top_p=0.0), "(0, 1]"),
        ("sampling.top_p", dict(top_p=1.5), "(0, 1]"),
        ("sampling.top_k", dict(top_k=-1), ">= 0"),
        ("sampling.repetition_penalty", dict(repetition_penalty=0.0), "[0.01, 100]"),
        # Positive but underflowing: would divide logits into infinities (was INTERNAL).
        ("sampling.repetition_penalty", dict(repetition_penalty=1.4e-45), "[0.01, 100]"),
        ("sampling.repetition_penalty", dict(repetition_penalty=1e-39), "[0.01, 100]"),
        ("sampling.repetition_penalty", dict(repetition_penalty=1e30), "[0.01, 100]"),
        ("sampling.max_new_tokens", dict(max_new_tokens=0), "between 1 and 4096"),
        ("sampling.max_new_tokens", dict(max_new_tokens=5000), "between 1 and 4096"),
        ("prompt", dict(prompt=""), "empty"),
        ("prompt", dict(prompt="a" * 5001), "5000"),
        ("model", dict(model=""), "required"),
    ],
)
def test_bad_values_are_invalid_argument_naming_field_and_limit(stub, field, sampling, limit):
    kw = {k: sampling.pop(k) for k in ("prompt", "model") if k in sampling}
    for call in (stub.Generate, lambda r, **k: list(stub.GenerateStream(r, **k))):
        with pytest.raises(grpc.RpcError) as e:
            call(request(**kw, **sampling), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field) and limit in e.value.details()


def test_api_keys_map_to_owners_and_bad_keys_are_unauthenticated(models):
    s = ServerThread(settings(api_keys={"k-default": "default"}), DirectoryResolver(models))
    try:
        with grpc.insecure_channel(s.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for md in [(), (("authorization", "Bearer nope"),), (("authorization", "k"),)]:
                with pytest.raises(grpc.RpcError) as e:
                    stub.Generate(request(max_new_tokens=2), metadata=md, timeout=30)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.Generate(
                request(max_new_tokens=2, temperature=0),
                metadata=(("authorization", "Bearer k-default"),),
                timeout=30,
            )
            assert ok.usage.completion_tokens == 2
    finally:
        s.stop()


def test_auth_helper_maps_keys_to_owners():
    from lmforge_server.auth import AuthError, owner_from_metadata

    keys = {"k1": "alice", "k2": "bob"}
    assert owner_from_metadata((), {}) == "default"
    assert owner_from_metadata([("authorization", "Bearer k2")], keys) == "bob"
    assert owner_from_metadata([("Authorization", b"bearer  k1 ")], keys) == "alice"
    for md in [(), [("authorization", "Bearer k3")], [("authorization", "Basic k1")]]:
        with pytest.raises(AuthError):
            owner_from_metadata(md, keys)


# --- cancellation and concurrency ---------------------------------------------------------


def cancelled_count(stub, server) -> int:
    stub.GetModelInfo(inference_pb2.GetModelInfoRequest(model="cyc"), timeout=30)  # loaded
    return server.stats()["cyc"]["finished"].get("cancelled", 0)


def test_cancel_mid_stream_frees_the_slot(stub, server):
    before = cancelled_count(stub, server)
    with DecodeGate(server, "cyc", allow=8) as gate:  # it cannot run to its end before the cancel
        call = stub.GenerateStream(
            request("cyc", "a", temperature=0, max_new_tokens=4000), timeout=60
        )
        first = next(call)
        assert first.text and not first.final
        call.cancel()
        wait_until(lambda: gate.stopped(before), "the server saw the cancel")
        gate.open()
        st = wait_idle(server, "cyc")
    assert st["finished"].get("cancelled", 0) == before + 1


def test_deadline_stops_generation(stub, server):
    before = cancelled_count(stub, server)
    finished_before = dict(server.stats()["cyc"]["finished"])
    with DecodeGate(server, "cyc", allow=8) as gate:  # held after its first token: it cannot finish
        call = stub.GenerateStream(
            request("cyc", "a", temperature=0, max_new_tokens=4000), timeout=1.0
        )
        assert next(call).text  # admitted and generating before its deadline
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: gate.stopped(before), "the server stopped it at its deadline")
        gate.open()
        st = wait_idle(server, "cyc")
    assert st["finished"].get("cancelled", 0) == before + 1
    assert st["finished"].get("length", 0) == finished_before.get("length", 0)


def test_sixteen_concurrent_streams_match_sequential_greedy(stub, reference, server):
    model, tok = reference
    jobs = [(PROMPTS[i % len(PROMPTS)], 10 + 3 * i) for i in range(16)]
    eos = tok.get_vocab_size() - 1
    expected = [torch_greedy(model, tok.encode(p).ids, n, eos=eos) for p, n in jobs]

    def one(job):
        prompt, n = job
        return collect(stub, request(prompt=prompt, max_new_tokens=n, temperature=0))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs))
    for (text, ids, _), want in zip(results, expected, strict=True):
        assert ids == want
        assert text == tok.decode([t for t in want if t != eos])
    wait_idle(server, "char")


def test_model_info_and_health(stub, server, reference):
    vocab = reference[1].get_vocab_size()
    info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(model="char"), timeout=30)
    assert info.execution_provider == "CPUExecutionProvider" and info.dtype == "fp32"
    assert (info.context_length, info.vocab_size, info.eos_token_id) == (96, vocab, vocab - 1)
    assert info.loaded
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


# --- the core without gRPC ----------------------------------------------------------------


def test_engine_lru_keeps_at_most_max_loaded_models(models):
    async def main():
        engine = Engine(settings(max_loaded_models=1), DirectoryResolver(models))
        p = SamplingParams(max_new_tokens=3, temperature=0)
        await engine.complete("default", "char", "ROMEO:", p)
        await engine.complete("default", "cyc", "a", p)
        loaded = list(engine.stats())
        info = await engine.model_info("default", "char", load=False)
        with pytest.raises(InvalidArgument):
            await engine.complete("default", "char", "", p)
        await engine.close()
        return loaded, info

    loaded, info = asyncio.run(main())
    assert loaded == ["cyc"] and not info.loaded


def test_models_resolve_through_the_redis_registry(tmp_path, models):
    from lmforge_server.redis_server import RedisServer
    from lmforge_server.store import JobRecord, Store

    with RedisServer(tmp_path / "redis", appendonly=False) as redis_server:
        store = Store.from_url(redis_server.url)
        job = JobRecord(
            id="job_1",
            owner="default",
            dataset_id="d",
            model_name="poet",
            model_id="mdl_1",
            state="QUEUED",
            spec={},
            parameters={},
            created_at=1.0,
        )
        store.create_job(job, max_active=10)
        store.r.hset("lmf:model:mdl_1", mapping={"path": str(models / "char")})

        async def main():
            engine = Engine(settings(), store)
            try:
                with pytest.raises(ModelNotReady, match="training"):
                    await engine.complete("default", "poet", "ROMEO:", SamplingParams())
                store.r.hset("lmf:model:mdl_1", mapping={"state": "READY"})
                done = await engine.complete(
                    "default", "poet@1", "ROMEO:", SamplingParams(max_new_tokens=3)
                )
                with pytest.raises(ModelNotFound):
                    await engine.complete("someone-else", "poet", "ROMEO:", SamplingParams())
                return done
            finally:
                await engine.close()

        done = asyncio.run(main())
        assert done.model_id == "mdl_1" and done.completion_tokens == 3
