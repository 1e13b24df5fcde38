"""Inference promises checked by value: logprobs against PyTorch, seeded sampling under
load, FINISH_REASON_EOS, the default max_new_tokens, a full queue, streams on an evicted
model. Real ONNX Runtime behind a real grpc.aio server on loopback; tiny exported models."""

from __future__ import annotations

import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from _tiny_models import build_cycle_model_dir, build_model_dir, load_torch
from test_inference_server import (
    DecodeGate,
    ServerThread,
    collect,
    request,
    settings,
    wait_idle,
    wait_until,
)
from tokenizers import Tokenizer

from lmforge.v1 import inference_pb2, inference_pb2_grpc
from lmforge_server.inference.resolver import DirectoryResolver
from lmforge_server.inference.scheduler import QUEUE_PER_SLOT

F = inference_pb2
CYCLE = b"abcdefgh"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_model_dir(root / "char", weight_scale=50.0, context_length=96)
    shutil.copytree(root / "char", root / "char-copy")
    build_cycle_model_dir(root / "cyc", CYCLE, context_length=2048)
    build_cycle_model_dir(root / "eos", b"xyz", eos_after=ord("z"))
    return root


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
    tok = Tokenizer.from_file(str(models / "char" / "tokenizer.json"))
    return load_torch(models / "char"), tok


def test_greedy_logprobs_equal_pytorch_log_softmax_and_stream_equals_unary(stub, reference):
    model, tok = reference
    prompt = "JULIET: O"
    req = request(prompt=prompt, max_new_tokens=30, temperature=0, logprobs=True)
    resp = stub.Generate(req, timeout=60)
    _, ids, msgs = collect(stub, req)
    assert list(resp.token_ids) == ids and len(ids) == 30
    streamed = [lp for m in msgs for lp in m.logprobs]
    assert streamed == list(resp.logprobs)

    context = tok.encode(prompt).ids
    with torch.no_grad():
        for token, logprob in zip(ids, resp.logprobs, strict=True):
            logits, _ = model(torch.tensor([context]))
            ref = torch.log_softmax(logits[0, -1].double(), -1)
            assert token == int(ref.argmax())
            # Scaled weights give logits in the hundreds: 1e-4 relative to that scale.
            assert logprob == pytest.approx(
                float(ref[token]), abs=1e-4 * max(1.0, abs(float(ref[token])))
            )
            context.append(token)


def test_sixteen_concurrent_seeded_streams_equal_the_same_requests_one_at_a_time(stub, server):
    prompts = ["ROMEO:", "JULIET: O", "First Citizen:", "A", "What, ho!", "Before we"]
    reqs = [
        request(
            prompt=prompts[i % len(prompts)],
            max_new_tokens=12 + i,
            temperature=0.7 + 0.05 * i,
            top_k=[0, 5, 20][i % 3],
            top_p=[1.0, 0.9, 0.6][i % 3],
            repetition_penalty=[1.0, 1.3][i % 2],
            seed=1000 + i,
            logprobs=True,
        )
        for i in range(16)
    ]

    def key(result):
        text, ids, msgs = result
        return text, ids, [lp for m in msgs for lp in m.logprobs], msgs[-1].finish_reason

    one_at_a_time = [key(collect(stub, r)) for r in reqs]
    with ThreadPoolExecutor(16) as pool:
        together = [key(r) for r in pool.map(lambda r: collect(stub, r), reqs)]
    # Same seed, same output: texts, tokens and finish reasons exactly; logprobs up to the
    # float rounding a batched matmul may differ by.
    assert [(t, i, f) for t, i, _, f in together] == [(t, i, f) for t, i, _, f in one_at_a_time]
    for (_, _, got, _), (_, _, want, _) in zip(together, one_at_a_time, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    assert len({r[0] for r in one_at_a_time}) > 8  # they really sampled different texts
    for _, ids, logprobs, _ in one_at_a_time:
        assert len(logprobs) == len(ids) and all(lp <= 0 and math.isfinite(lp) for lp in logprobs)
    wait_idle(server, "char")


def test_end_of_text_ends_generation_with_finish_reason_eos(stub):
    # The `eos` model emits "yz" after "x", then its end-of-text token.
    info = stub.GetModelInfo(F.GetModelInfoRequest(model="eos"), timeout=30)
    for call in ("unary", "stream"):
        req = request("eos", "x", temperature=0, max_new_tokens=50)
        if call == "unary":
            r = stub.Generate(req, timeout=60)
            text, ids, final = r.text, list(r.token_ids), r
        else:
            text, ids, msgs = collect(stub, req)
            final = msgs[-1]
        assert text == "yz"
        assert ids == [ord("y"), ord("z"), info.eos_token_id]
        assert final.finish_reason == F.FINISH_REASON_EOS
        assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (1, 3)


def test_max_new_tokens_defaults_to_64(stub):
    req = F.GenerateRequest(model="cyc", prompt="a", sampling=F.SamplingParams(temperature=0))
    resp = stub.Generate(req, timeout=60)
    assert resp.usage.completion_tokens == 64 and len(resp.token_ids) == 64
    assert resp.finish_reason == F.FINISH_REASON_LENGTH
    assert resp.text == (CYCLE[1:] + CYCLE[:1]).decode() * 8
    # No sampling message at all: the same default, though sampling at temperature 1 from
    # this model may draw its end-of-text token first (it ended the run early, seen here).
    no_sampling = stub.Generate(F.GenerateRequest(model="cyc", prompt="a"), timeout=60)
    n = no_sampling.usage.completion_tokens
    assert n == 64 or (n < 64 and no_sampling.finish_reason == F.FINISH_REASON_EOS), no_sampling


def test_a_full_queue_is_resource_exhausted_naming_the_limit(models):
    s = ServerThread(settings(max_batch_size=1), DirectoryResolver(models))
    calls = []
    try:
        with grpc.insecure_channel(s.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            long = request("cyc", "a", temperature=0, max_new_tokens=2000)
            running = stub.GenerateStream(long, timeout=120)
            calls.append(running)
            assert next(running).text  # the one slot is taken
            for _ in range(QUEUE_PER_SLOT):
                calls.append(stub.GenerateStream(long, timeout=120))
            deadline = time.monotonic() + 30
            while s.stats()["cyc"]["queued"] < QUEUE_PER_SLOT and time.monotonic() < deadline:
                time.sleep(0.01)
            assert s.stats()["cyc"]["queued"] == QUEUE_PER_SLOT
            for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
                with pytest.raises(grpc.RpcError) as e:
                    call(request("cyc", "a", max_new_tokens=1), timeout=30)
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert f"limit {QUEUE_PER_SLOT}" in e.value.details()
            for c in calls:
                c.cancel()
            wait_idle(s, "cyc")
            # Once the queue drains, the same request is served.
            done = stub.Generate(request("cyc", "a", temperature=0, max_new_tokens=1), timeout=30)
            assert done.text == "b"
    finally:
        s.stop()


def test_a_stream_finishes_on_a_model_evicted_from_the_cache(models):
    s = ServerThread(settings(max_loaded_models=1), DirectoryResolver(models))
    try:
        with grpc.insecure_channel(s.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            n = 200
            stub.GetModelInfo(F.GetModelInfoRequest(model="cyc"), timeout=60)  # loaded
            with DecodeGate(s, "cyc") as gate:  # the stream stays in flight during the loads
                stream = stub.GenerateStream(
                    request("cyc", "a", temperature=0, max_new_tokens=n), timeout=120
                )
                first = next(stream)
                evicted = gate.scheduler
                # Its first token may arrive before its row joins the batch: wait for the gate.
                wait_until(gate.holding.is_set, "the next decode step reached the gate")
                assert s.stats()["cyc"]["active"] == 1
                # Loading two other models evicts `cyc` while its stream is in flight.
                for other in ("char", "char-copy"):
                    stub.Generate(request(other, "ROMEO:", max_new_tokens=2), timeout=60)
                assert list(s.stats()) == ["char-copy"]
                gate.open()
                rest = list(stream)
            assert dict(evicted.finished) == {"length": 1}  # it ended on the evicted session
            text = first.text + "".join(m.text for m in rest)
            ids = list(first.token_ids) + [t for m in rest for t in m.token_ids]
            cycle = (CYCLE[1:] + CYCLE[:1]).decode()
            assert len(ids) == n and text == (cycle * (n // len(cycle) + 1))[:n]
            assert rest[-1].final and rest[-1].finish_reason == F.FINISH_REASON_LENGTH
            # The evicted model loads again on demand.
            again = stub.Generate(request("cyc", "a", temperature=0, max_new_tokens=3), timeout=60)
            assert again.text == "bcd"
    finally:
        s.stop()


def test_sampling_logprobs_are_the_raw_distributions(stub, reference):
    """With temperature and top-k, the logprob is still log-softmax of the model's logits."""
    model, tok = reference
    prompt = "ROMEO:"
    r = stub.Generate(
        request(prompt=prompt, max_new_tokens=10, temperature=1.3, top_k=5, seed=7, logprobs=True),
        timeout=60,
    )
    context = tok.encode(prompt).ids
    with torch.no_grad():
        for token, logprob in zip(r.token_ids, r.logprobs, strict=True):
            logits, _ = model(torch.tensor([context]))
            ref = torch.log_softmax(logits[0, -1].double(), -1)
            top5 = set(torch.topk(logits[0, -1], 5).indices.tolist())
            assert token in top5
            assert logprob == pytest.approx(
                float(ref[token]), abs=1e-4 * max(1.0, abs(float(ref[token])))
            )
            context.append(token)
    assert np.isfinite(r.logprobs).all()


def test_timings_are_consistent_with_each_other_and_the_token_count(stub):
    for call in ("unary", "stream"):
        req = request("cyc", "a", temperature=0, max_new_tokens=200)
        final = stub.Generate(req, timeout=60) if call == "unary" else collect(stub, req)[2][-1]
        t, n = final.timings, final.usage.completion_tokens
        assert n == 200
        assert 0 <= t.queue_ms <= t.time_to_first_token_ms <= t.total_ms
        # tokens/s is the decode speed: the n - 1 tokens after the first, over at most the
        # time between the first token and the end.
        decode_s = (t.total_ms - t.time_to_first_token_ms) / 1e3
        assert t.tokens_per_second > 0
        assert t.tokens_per_second * decode_s >= (n - 1) * (1 - 1e-3)


def test_model_info_names_the_model_it_serves(stub, reference):
    info = stub.GetModelInfo(F.GetModelInfoRequest(model="eos"), timeout=30)
    assert (info.model_id, info.name) == ("eos", "eos")
    assert (info.vocab_size, info.eos_token_id, info.context_length) == (257, 256, 96)
