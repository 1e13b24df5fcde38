"""The vLLM/SGLang-style request surface and the scheduler's guarantees.

Through gRPC (a real grpc.aio server on loopback, real ONNX Runtime): request_id echoed
and Abort, n samples, top_logprobs, min_tokens, stop_token_ids, logit_bias,
include_stop_str_in_output, context_shift, bad inputs. On the scheduler itself (real
ONNX Runtime session, no gRPC): batched prefill, prefix reuse, streams joining and leaving
at random steps, a poisoned sample failing alone, the queue check before tokenising.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from _scheduler_runs import Collector
from _tiny_models import build_cycle_model_dir, build_model_dir, load_torch, torch_greedy
from test_inference_server import ServerThread, collect, request, settings
from tokenizers import Tokenizer

from lmforge.v1 import inference_pb2, inference_pb2_grpc
from lmforge_server.inference.engine import Engine, Overloaded
from lmforge_server.inference.resolver import DirectoryResolver
from lmforge_server.inference.sampling import SamplingParams
from lmforge_server.inference.scheduler import PrefixCache, Scheduler, make_requests
from lmforge_server.inference.session import CPU_EP, OrtModel

CYCLE = "añ€😀".encode()
LONG = "First Citizen:\nBefore we proceed any further, hear me speak."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_model_dir(root / "char", weight_scale=50.0, context_length=96)
    build_cycle_model_dir(root / "cyc", CYCLE, context_length=4096)
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


@pytest.fixture(scope="module")
def byte_id(models):
    tok = Tokenizer.from_file(str(models / "cyc" / "tokenizer.json"))
    return lambda ch: tok.encode(ch, add_special_tokens=False).ids


def gen(stub, model="char", prompt="ROMEO:", *, rid="", shift=False, **sampling):
    req = request(model=model, prompt=prompt, **sampling)
    req.request_id, req.context_shift = rid, shift
    return req


# --- request ids and Abort ----------------------------------------------------------------


def test_request_id_is_echoed_in_every_message_and_made_up_when_empty(stub):
    _, _, msgs = collect(stub, gen(stub, rid="client-7", max_new_tokens=12, temperature=0))
    assert len(msgs) > 1 and {m.request_id for m in msgs} == {"client-7"}
    _, _, msgs = collect(stub, gen(stub, max_new_tokens=5, temperature=0))
    made_up = {m.request_id for m in msgs}
    assert len(made_up) == 1 and len(made_up.pop()) == 32
    resp = stub.Generate(gen(stub, rid="unary-1", max_new_tokens=3), timeout=30)
    assert resp.request_id == "unary-1"


def test_abort_ends_the_callers_request_and_nothing_else(stub):
    long = gen(stub, "cyc", "a", rid="to-abort", temperature=0, max_new_tokens=4000)
    other = gen(stub, "cyc", "a", rid="keeps-going", temperature=0, max_new_tokens=30)
    call = stub.GenerateStream(long, timeout=60)
    first = next(call)
    assert first.request_id == "to-abort" and not first.final
    # While it runs, the same id is refused.
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(gen(stub, "cyc", "a", rid="to-abort", max_new_tokens=2), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("request_id") and "in flight" in e.value.details()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(collect, stub, other)
        resp = stub.Abort(inference_pb2.AbortRequest(request_id="to-abort"), timeout=10)
        _, ids, msgs = fut.result(60)
    assert resp.aborted
    rest = list(call)
    assert rest[-1].final and rest[-1].finish_reason == inference_pb2.FINISH_REASON_CANCELLED
    assert len(ids) == 30 and msgs[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    # Gone now, or never there: nothing to abort.
    again = stub.Abort(inference_pb2.AbortRequest(request_id="to-abort"), timeout=10)
    assert not again.aborted
    with pytest.raises(grpc.RpcError) as e:
        stub.Abort(inference_pb2.AbortRequest(request_id=""), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("request_id")


def test_abort_never_reaches_another_owners_request(models):
    async def main():
        engine = Engine(settings(), DirectoryResolver(models))
        params = SamplingParams(max_new_tokens=2000, temperature=0)
        stream = engine.generate("default", "cyc", "a", params, request_id="shared-id")
        first = await stream.__anext__()
        assert not engine.abort("someone-else", "shared-id")
        assert engine.abort("default", "shared-id")
        reasons = [d.finish_reason async for d in stream]
        await engine.close()
        return first, reasons

    first, reasons = asyncio.run(main())
    assert first.request_id == "shared-id" and reasons[-1] == "cancelled"


# --- the sampling surface ----------------------------------------------------------------


def test_n_samples_share_one_prefill_and_each_matches_its_own_seed(stub, server):
    kw = dict(temperature=1.0, top_k=20, max_new_tokens=20)
    stats = server.stats().get("char", {"prefilled_groups": 0})
    msgs = list(stub.GenerateStream(gen(stub, seed=77, n=3, **kw), timeout=60))
    assert server.stats()["char"]["prefilled_groups"] == stats["prefilled_groups"] + 1
    assert sum(m.final for m in msgs) == 3 and msgs[-1].final
    samples = {i: [t for m in msgs if m.index == i for t in m.token_ids] for i in range(3)}
    singles = [collect(stub, gen(stub, seed=77 + i, **kw))[1] for i in range(3)]
    assert [samples[i] for i in range(3)] == singles
    assert len({tuple(s) for s in singles}) > 1  # different seeds, different samples
    texts = {i: "".join(m.text for m in msgs if m.index == i) for i in range(3)}
    resp = stub.Generate(gen(stub, seed=77, n=3, logprobs=True, top_logprobs=2, **kw), timeout=60)
    assert [list(c.token_ids) for c in resp.choices] == singles
    assert list(resp.token_ids) == singles[0] and resp.usage.completion_tokens == 60
    for i, c in enumerate(resp.choices):
        assert (c.index, c.text, c.completion_tokens) == (i, texts[i], 20)
        assert c.finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert len(c.logprobs) == len(c.top_logprobs) == 20
        assert all(len(t.token_ids) == 2 for t in c.top_logprobs)


def test_top_logprobs_are_the_k_most_likely_with_the_greedy_token_first(stub, reference):
    model, tok = reference
    ids = tok.encode("JULIET: O").ids
    resp = stub.Generate(
        gen(
            stub, prompt="JULIET: O", temperature=0, max_new_tokens=6, top_logprobs=5, logprobs=True
        ),
        timeout=30,
    )
    assert len(resp.top_logprobs) == len(resp.token_ids) == 6
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), last_only=True)
    want = torch.log_softmax(logits[0, -1].double(), -1)
    top = resp.top_logprobs[0]
    assert list(top.token_ids) == want.topk(5).indices.tolist()
    assert np.allclose(top.logprobs, want.topk(5).values.numpy(), atol=1e-4)
    for chosen, lp, step in zip(resp.token_ids, resp.logprobs, resp.top_logprobs, strict=True):
        assert step.token_ids[0] == chosen and abs(step.logprobs[0] - lp) < 1e-6
        assert list(step.logprobs) == sorted(step.logprobs, reverse=True)


def test_stop_token_ids_end_the_generation_and_min_tokens_holds_them_off(stub, byte_id):
    # The cycle model emits "ñ€😀a" over and over after "a": byte "a" every 10th token.
    (a,) = byte_id("a")
    text, ids, msgs = collect(stub, gen(stub, "cyc", "a", temperature=0, stop_token_ids=[a]))
    assert msgs[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
    assert text == "ñ€😀" and len(ids) == 10 and ids[-1] == a
    text, ids, _ = collect(
        stub,
        gen(stub, "cyc", "a", temperature=0, stop_token_ids=[a], include_stop_str_in_output=True),
    )
    assert text == "ñ€😀a"
    text, ids, msgs = collect(
        stub, gen(stub, "cyc", "a", temperature=0, stop_token_ids=[a], min_tokens=15)
    )
    # "a" was held off for 15 tokens (the cycle went elsewhere), then ended it.
    assert len(ids) >= 16 and ids[-1] == a and a not in ids[:-1]
    assert msgs[-1].finish_reason == inference_pb2.FINISH_REASON_STOP


def test_min_tokens_holds_off_stop_sequences_and_include_stop_str_keeps_them(stub):
    text, _, _ = collect(stub, gen(stub, "cyc", "a", temperature=0, stop=["😀a"]))
    assert text == "ñ€"
    text, _, _ = collect(
        stub, gen(stub, "cyc", "a", temperature=0, stop=["😀a"], include_stop_str_in_output=True)
    )
    assert text == "ñ€😀a"
    text, ids, msgs = collect(
        stub, gen(stub, "cyc", "a", temperature=0, stop=["😀a"], min_tokens=12)
    )
    assert text == "ñ€😀añ€" and msgs[-1].finish_reason == inference_pb2.FINISH_REASON_STOP


def test_logit_bias_moves_greedy_choices(stub, reference):
    _, tok = reference
    (x,) = tok.encode("x").ids
    resp = stub.Generate(
        gen(stub, temperature=0, max_new_tokens=8, logit_bias={x: 100.0}), timeout=30
    )
    assert list(resp.token_ids) == [x] * 8 and resp.text == "x" * 8
    plain = stub.Generate(gen(stub, temperature=0, max_new_tokens=8), timeout=30)
    first = plain.token_ids[0]
    banned = stub.Generate(
        gen(stub, temperature=0, max_new_tokens=8, logit_bias={first: -100.0}), timeout=30
    )
    assert first not in banned.token_ids


def test_context_shift_generates_past_the_context_like_a_sliding_window(stub, reference):
    model, tok = reference
    prompt = ("To be, or not to be: that is the question: " * 3)[:90]
    text, ids, msgs = collect(
        stub, gen(stub, prompt=prompt, shift=True, temperature=0, max_new_tokens=60)
    )
    assert len(ids) == 60 and msgs[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    # The window (96) fills at the 7th token, keeps 48, and fills again at the 56th.
    assert msgs[-1].context_shifts == 2
    resp = stub.Generate(gen(stub, prompt=prompt, shift=True, temperature=0, max_new_tokens=60))
    assert list(resp.token_ids) == ids and resp.context_shifts == 2
    # Reference: the next token is greedy over the window, which keeps its newest half
    # whenever it would pass the context (96).
    seq, start, want = tok.encode(prompt).ids, 0, []
    with torch.no_grad():
        for _ in range(60):
            if len(seq) - start > 96:
                start = len(seq) - 48
            logits, _ = model(torch.tensor([seq[start:]]), last_only=True)
            seq.append(int(logits[0, -1].argmax()))
            want.append(seq[-1])
    assert ids == want


def test_a_repeated_prefix_is_served_from_the_cache_with_the_same_tokens(stub):
    first = stub.Generate(gen(stub, prompt=LONG + " A", temperature=0, max_new_tokens=10))
    again = stub.Generate(gen(stub, prompt=LONG + " A", temperature=0, max_new_tokens=10))
    other = list(stub.GenerateStream(gen(stub, prompt=LONG + " B", temperature=0)))
    assert first.cached_prompt_tokens == 0
    assert again.cached_prompt_tokens == len(LONG) + 1  # all but the last prompt token
    assert list(again.token_ids) == list(first.token_ids)
    assert other[-1].cached_prompt_tokens == len(LONG) + 1
    assert all(m.cached_prompt_tokens == 0 for m in other[:-1])


@pytest.mark.parametrize(
    ("field", "changes", "limit"),
    [
        ("sampling.n", dict(n=0), "between 1 and 16"),
        ("sampling.n", dict(n=17), "between 1 and 16"),
        ("sampling.top_logprobs", dict(top_logprobs=21), "between 0 and 20"),
        ("sampling.top_logprobs", dict(top_logprobs=-1), "between 0 and 20"),
        ("sampling.min_tokens", dict(min_tokens=-1), ">= 0"),
        ("sampling.min_tokens", dict(min_tokens=9, max_new_tokens=5), "<= max_new_tokens (5)"),
        ("sampling.stop_token_ids", dict(stop_token_ids=[10_000]), "0 to "),
        ("sampling.stop_token_ids", dict(stop_token_ids=[-1]), "0 to "),
        ("sampling.stop_token_ids", dict(stop_token_ids=list(range(65))), "at most 64"),
        ("sampling.logit_bias", dict(logit_bias={10_000: 1.0}), "0 to "),
        ("sampling.logit_bias", dict(logit_bias={1: 101.0}), "[-100, 100]"),
        ("sampling.logit_bias", dict(logit_bias={1: float("nan")}), "[-100, 100]"),
        ("sampling.logit_bias", dict(logit_bias={i: 1.0 for i in range(301)}), "at most 300"),
        ("request_id", dict(rid="x" * 129), "128"),
        ("request_id", dict(rid="bad\nid"), "printable"),
        ("variant", dict(variant="int3"), "not exported"),
    ],
)
def test_bad_surface_values_are_invalid_argument_naming_field_and_limit(
    stub, field, changes, limit
):
    rid = changes.pop("rid", "")
    variant = changes.pop("variant", "")
    req = gen(stub, rid=rid, **changes)
    req.variant = variant
    for call in (stub.Generate, lambda r, **k: list(stub.GenerateStream(r, **k))):
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field) and limit in e.value.details()


# --- the scheduler on its own ---------------------------------------------------------------


@pytest.fixture(scope="module")
def char_model(models):
    return OrtModel(models / "char", providers=[CPU_EP])


def submit(sched, model, ids, params, max_new, **kw):
    out = Collector()
    sched.submit(make_requests(model, ids, params, out, model_id="char", max_new=max_new, **kw))
    return out


def test_requests_arriving_together_prefill_in_one_call_and_match_pytorch(char_model, reference):
    torch_model, tok = reference
    sched = Scheduler(char_model, max_batch_size=16, prefix_cache=PrefixCache(max_bytes=0))
    greedy = SamplingParams(temperature=0)
    prompts = ["ROMEO:", "JULIET: O", "First Citizen:\nBefore we proceed", "A", "What, ho!"]
    try:
        with sched._cv:  # the thread wakes only once all are queued
            outs = [submit(sched, char_model, tok.encode(p).ids, greedy, 15) for p in prompts]
        for out in outs:
            out.final()
        assert (sched.prefill_calls, sched.prefilled_groups) == (1, len(prompts))
        eos = tok.get_vocab_size() - 1
        for p, out in zip(prompts, outs, strict=True):
            assert out.tokens() == torch_greedy(torch_model, tok.encode(p).ids, 15, eos=eos)
    finally:
        sched.close(wait=True)


# A first request of one token gives its slot back while its prompt is being remembered:
# what is kept must be the prompt's cache, not the released slot's nothing. Requests one
# after another run in the same slot, which still holds the previous prompt: the prefix
# comes from there (in_slot) or, with that turned off, from the PrefixCache (copied in).
@pytest.mark.parametrize("in_slot", [True, False], ids=["from-the-slot", "from-the-lru"])
@pytest.mark.parametrize("first_tokens", [5, 1], ids=["first-runs-on", "first-ends-at-once"])
def test_prefix_reuse_gives_the_output_of_a_cold_prompt(
    char_model, reference, first_tokens, in_slot
):
    torch_model, tok = reference
    sched = Scheduler(char_model, max_batch_size=4, reuse_resident=in_slot)
    greedy = SamplingParams(temperature=0)
    base = tok.encode(LONG).ids
    try:
        submit(sched, char_model, base, greedy, first_tokens).final()
        for extra in (" Speak!", "\nFirst", ""):
            ids = tok.encode(LONG + extra).ids
            out = submit(sched, char_model, ids, greedy, 12)
            final = out.final()
            assert final.cached_prompt_tokens == min(len(base), len(ids) - 1)
            assert out.tokens() == torch_greedy(torch_model, ids, 12)
        assert (sched.resident_hits, sched.prefixes.hits) == ((3, 0) if in_slot else (0, 3))
    finally:
        sched.close(wait=True)


def test_a_slot_under_a_running_row_forgets_the_prompt_it_held(char_model, reference):
    """A free slot below the batch's highest one runs a throwaway row at position 0 of each
    decode step: the prompt it held is gone, and the next prompt there starts cold."""
    torch_model, tok = reference
    sched = Scheduler(char_model, max_batch_size=2, prefix_cache=PrefixCache(max_bytes=0))
    greedy = SamplingParams(temperature=0)
    base = tok.encode(LONG).ids
    try:
        with sched._cv:  # admitted together: the long prompt in slot 0, the stream in 1
            ends = submit(sched, char_model, base, greedy, 1)
            runs = submit(sched, char_model, tok.encode("ROMEO:").ids, greedy, 20)
        ends.final()
        runs.final()
        for extra, cached in ((" Speak!", 0), ("\nFirst", len(base))):
            ids = tok.encode(LONG + extra).ids
            out = submit(sched, char_model, ids, greedy, 12)
            assert out.final().cached_prompt_tokens == cached
            assert out.tokens() == torch_greedy(torch_model, ids, 12)
        assert sched.resident_hits == 1
    finally:
        sched.close(wait=True)


def test_a_long_prompt_is_prefilled_in_chunks_between_running_streams_tokens(char_model, reference):
    torch_model, tok = reference
    sched = Scheduler(char_model, max_batch_size=4, prefill_chunk=8)
    greedy = SamplingParams(temperature=0)
    log, lock = [], threading.Lock()
    submitted = threading.Event()

    def logged(name):
        def emit(d):
            with lock:
                log.append((name, d))
            if name == "run":
                # The scheduler hands over the running stream's first token and waits here
                # until the long prompt is submitted: the stream is then certainly still
                # running when it arrives (under load, 40 tokens once ended before it did).
                submitted.wait(30)

        return emit

    run_ids, long_ids = tok.encode("ROMEO:").ids, tok.encode(LONG).ids  # 60 tokens
    try:
        sched.submit(
            make_requests(char_model, run_ids, greedy, logged("run"), model_id="c", max_new=40)
        )
        while not log:
            time.sleep(0.001)
        calls = sched.prefill_calls
        with lock:
            log.append(("submitted", None))
        sched.submit(
            make_requests(char_model, long_ids, greedy, logged("long"), model_id="c", max_new=10)
        )
        submitted.set()
        deadline = time.monotonic() + 30
        while sum(1 for n, d in log if d is not None and d.final) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        sched.close(wait=True)
    names = [n for n, _ in log]
    start, first_long = names.index("submitted"), names.index("long")
    # 60 tokens in chunks of 8: seven chunk turns, then the last 4 tokens and the first token.
    assert sched.prefill_calls - calls == 8
    assert names[start:first_long].count("run") >= 6  # a token for the stream every turn
    tokens = lambda name: [t for n, d in log if n == name for t in d.token_ids]  # noqa: E731
    assert tokens("long") == torch_greedy(torch_model, long_ids, 10)
    assert tokens("run") == torch_greedy(torch_model, run_ids, 40)


def test_prefix_cache_stays_within_its_byte_bound():
    cache = PrefixCache(max_bytes=3000, min_tokens=2)
    for i in range(10):
        cache.put([i, 1, 2, 3], [np.zeros((1, 1, 4, 100), np.float32)])  # 1600 bytes each
        assert cache.bytes <= 3000
    assert cache.get([9, 1, 2, 3, 4])[0] == 4 and cache.get([0, 1, 2, 3, 4])[1] is None


def test_prefix_cache_finds_the_longest_remembered_prefix_as_a_full_scan_would():
    # Random prompts over a 3-token vocabulary share prefixes of every length; the cache,
    # which only compares prompts with the same first min_tokens ids, must agree with a
    # scan of everything it still holds (evictions included).
    rng = np.random.default_rng(0)
    cache = PrefixCache(max_bytes=40 * 400, min_tokens=3)
    for _ in range(300):
        ids = rng.integers(0, 3, rng.integers(3, 12)).tolist()
        held = list(cache._entries)
        expect = 0
        for key in held:
            n = 0
            while n < min(len(key), len(ids) - 1) and key[n] == ids[n]:
                n += 1
            expect = max(expect, n)
        k, past = cache.get(ids)
        assert k == (expect if expect >= 3 else 0)
        assert (past is None) == (k == 0) and (past is None or past[0].shape[2] == k)
        cache.put(ids, [np.zeros((1, 1, len(ids), 100), np.float32)])
        assert cache.bytes <= cache.max_bytes


def test_streams_joining_and_leaving_at_random_steps_match_each_alone(models, reference):
    torch_model, tok = reference
    rng = random.Random(5)
    prompts = ["ROMEO:", "JULIET: O", "A", "What, ho!", "First Citizen:", "MENENIUS:"]
    jobs = [(rng.choice(prompts), rng.randint(3, 30), rng.random() * 0.05) for _ in range(12)]
    eos = tok.get_vocab_size() - 1

    async def main():
        engine = Engine(settings(max_batch_size=5), DirectoryResolver(models))

        async def one(prompt, n, delay):
            await asyncio.sleep(delay)
            done = await engine.complete(
                "default", "char", prompt, SamplingParams(temperature=0, max_new_tokens=n)
            )
            return done.token_ids

        try:
            return await asyncio.gather(*[one(*job) for job in jobs])
        finally:
            await engine.close()

    got = asyncio.run(main())
    for (prompt, n, _), ids in zip(jobs, got, strict=True):
        assert ids == torch_greedy(torch_model, tok.encode(prompt).ids, n, eos=eos)


def test_a_poisoned_sample_fails_alone_and_its_batch_completes(char_model, reference):
    torch_model, tok = reference
    sched = Scheduler(char_model, max_batch_size=8)
    greedy = SamplingParams(temperature=0)
    # Past validation (which now refuses it), a penalty of 1e-39 divides logits into
    # infinities: the sampling of that one request raises.
    poison = SamplingParams(temperature=1.0, repetition_penalty=1e-39, seed=1)
    prompts = ["ROMEO:", "JULIET: O", "What, ho!"]
    try:
        with sched._cv:
            outs = [submit(sched, char_model, tok.encode(p).ids, greedy, 20) for p in prompts[:2]]
            bad = submit(sched, char_model, tok.encode("A").ids, poison, 20)
            outs.append(submit(sched, char_model, tok.encode(prompts[2]).ids, greedy, 20))
        assert bad.final().finish_reason == "error"
        eos = tok.get_vocab_size() - 1
        for p, out in zip(prompts, outs, strict=True):
            assert out.final().finish_reason in ("length", "eos")
            assert out.tokens() == torch_greedy(torch_model, tok.encode(p).ids, 20, eos=eos)
        assert sched.finished["error"] == 1
    finally:
        sched.close(wait=True)


def test_a_full_queue_is_refused_before_the_prompt_is_tokenised(models):
    async def main():
        engine = Engine(settings(), DirectoryResolver(models))
        try:
            await engine.complete("default", "char", "A", SamplingParams(max_new_tokens=1))
            (loaded,) = engine._loaded.values()
            calls = []
            encode = loaded.model.encode
            loaded.model.encode = lambda text: calls.append(len(text)) or encode(text)
            loaded.scheduler.max_waiting = 0
            with pytest.raises(Overloaded, match="limit 0"):
                await engine.complete("default", "char", "ROMEO: " * 600, SamplingParams())
            return calls
        finally:
            await engine.close()

    assert asyncio.run(main()) == []
