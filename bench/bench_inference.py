"""Inference latency and throughput on the CPU, every target beside its baseline (not a CI test).

A `baby`-sized model (6 x 384, ~10.7M parameters, random weights, char tokenizer from the
bundled corpus), exported once with its int8 and int4 variants (scored on the corpus'
last tenth). Printed, in one run:
  1. the machine: cores and measured memory read bandwidth;
  2. batch 1, 64-token prompt, 128 greedy tokens: time to first token and ms/token for
     (a) GenerateStream through gRPC (server process, the variant it serves by default),
     (b) the in-process Engine for every variant, beside its weight-bandwidth floor,
     (c) PyTorch eager with a KV cache, (d) transformers `generate` (the baseline);
     time to first token again as the median of interleaved repetitions of (a), (a') the
     same server with prompts through the served variant's own graph instead of the w8a8
     prefill graph (LMFORGE_INFERENCE_PREFILL_GRAPH=0, the before) and (d), each on a
     prompt of its own (a repeated prompt would hit the prefix cache), with the load
     (`--ttft`: this table alone);
  3. aggregate tokens/s through gRPC at 1, 4, 16 and 64 concurrent streams, then what a
     decode step costs ONNX Runtime per variant at 1, 16 and 64 rows (one thread, CPU
     time, by op type) and the arithmetic that bounds 16 streams against one;
  4. prefix reuse: time to first token for a shared 200-token prefix + 10 new tokens,
     with the prefix still in the request's slot and copied in from the LRU, against a
     cold prompt of the same length (medians of interleaved repetitions);
  5. inter-token latency p99 of 8 running streams while a 1,000-token prompt arrives,
     chunked prefill against the whole prompt at once, alternated (in-process Engine,
     the same weights with a 2,048-token context);
  6. with --gpt2: the GPT-2-small shape (12 x 768, vocab 50257, ~124M) at batch 1, fp32
     and int8/int4 against the bandwidth floor (its export takes minutes here).

    python bench/bench_inference.py [--repeats 3] [--gpt2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmforge.v1 import inference_pb2, inference_pb2_grpc
from lmforge_server import specs
from lmforge_server.inference.engine import Engine
from lmforge_server.inference.resolver import DirectoryResolver
from lmforge_server.inference.sampling import SamplingParams
from lmforge_server.inference.scheduler import PREFILL_CHUNK
from lmforge_server.settings import Settings
from lmforge_worker.export import decode_ms_per_token, export_onnx
from lmforge_worker.graph import cache_head_dim
from lmforge_worker.model import Llama, load_pretrained, save_pretrained
from lmforge_worker.tokenization import build_tokenizer, save_tokenizer

CORPUS = Path(specs.__file__).parent / "data" / "tinyshakespeare.txt"
PROMPT_TOKENS, NEW_TOKENS = 64, 128
CONCURRENCY = (1, 4, 16, 64)
ITL_REPEATS = 3


def read_bandwidth_gbs() -> float:
    """Memory read bandwidth with torch's threads: the best of 5 sums over 512 MB."""
    x = torch.ones(128 << 20, dtype=torch.float32)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def one_core_rates() -> tuple[float, float, float]:
    """(memory read GB/s, fp32 GEMM GFLOP/s, int8 GEMM GOP/s) on one core, to set against
    ONNX Runtime's one-thread step costs: the best of 5 runs each (a 512 MB sum, a 1,024^3
    torch product, a 256 x 1,024 x 1,024 ORT MatMulInteger u8 x s8, the kernel MatMulNBits'
    int8 compute and dynamic int8 use)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bandwidth = read_bandwidth_gbs()
        a = torch.randn(1024, 1024)
        a @ a
        fp32 = 2 * 1024**3 / min(_timed(lambda: a @ a) for _ in range(5)) / 1e9
    finally:
        torch.set_num_threads(threads)
    w = numpy_helper.from_array(np.ones((1024, 1024), np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [256, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [256, 1024])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = {"x": np.ones((256, 1024), np.uint8)}
    sess.run(None, x)
    int8 = 2 * 256 * 1024**2 / min(_timed(lambda: sess.run(None, x)) for _ in range(5)) / 1e9
    return bandwidth, fp32, int8


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build_model(root: Path) -> tuple[Path, list[str], dict]:
    text = CORPUS.read_text()
    tok = build_tokenizer("char", text)
    spec = specs.resolve("baby", {}, {}, num_distinct_chars=len(set(text)))
    torch.manual_seed(0)
    model = Llama(spec.model)
    path = root / "models" / "baby"
    save_pretrained(model, path)
    save_tokenizer(tok, path / "tokenizer.json")
    val = np.asarray(tok.encode(text[-len(text) // 10 :]).ids)
    t = time.perf_counter()
    facts = export_onnx(path, eval_tokens=val)
    print(
        f"model: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{spec.model.n_layers}x{spec.model.d_model}, vocab {spec.model.vocab_size}, "
        f"context {spec.model.context_length}; export with variants "
        f"{time.perf_counter() - t:.1f}s, fp32 parity {facts['max_abs_diff']:.2e}"
    )
    # 64-character (= 64-token) prompts from the corpus, distinct per stream.
    prompts = [text[i * 1000 : i * 1000 + PROMPT_TOKENS] for i in range(1, 65)]
    assert all(len(tok.encode(p).ids) == PROMPT_TOKENS for p in prompts)
    return path, prompts, facts


# --- gRPC, server in another process ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifacts: Path, **overrides) -> tuple[subprocess.Popen, str]:
    addr = f"127.0.0.1:{free_port()}"
    settings = Settings(
        artifacts=str(artifacts), inference_addr=addr, inference_device="cpu", **overrides
    )
    env = {**os.environ, **settings.to_env()}
    env["LMFORGE_REDIS_URL"] = ""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge_server.launch", "inference"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc, addr
            except grpc.RpcError:
                time.sleep(0.1)
    proc.kill()
    raise RuntimeError("inference server did not become SERVING")


def grpc_stream(stub, prompt: str, n: int = NEW_TOKENS) -> tuple[float, float, int]:
    """(time to first token s, decode s per token, tokens) for one GenerateStream."""
    req = inference_pb2.GenerateRequest(
        model="baby",
        prompt=prompt,
        sampling=inference_pb2.SamplingParams(max_new_tokens=n, temperature=0),
    )
    t0 = time.perf_counter()
    first = last = None
    count = 0
    for msg in stub.GenerateStream(req, timeout=600):
        if msg.token_ids:
            now = time.perf_counter()
            first = first or now
            last = now
            count += len(msg.token_ids)
    return first - t0, (last - first) / max(1, count - 1), count


def grpc_concurrent(stub, prompts: list[str]) -> float:
    counts = [0] * len(prompts)

    def one(i):
        counts[i] = grpc_stream(stub, prompts[i])[2]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(counts) / (time.perf_counter() - t)


# --- the engine in-process -----------------------------------------------------------------------


async def engine_stream(engine: Engine, prompt: str, variant: str) -> tuple[float, float, int]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0)
    t0 = time.perf_counter()
    first = last = None
    count = 0
    async for d in engine.generate("default", "baby", prompt, params, variant=variant):
        if d.token_ids:
            now = time.perf_counter()
            first = first or now
            last = now
            count += len(d.token_ids)
    return first - t0, (last - first) / max(1, count - 1), count


# --- PyTorch eager with a KV cache, transformers -------------------------------------------------


@torch.no_grad()
def torch_eager(model: Llama, ids: torch.Tensor) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    logits, past = model(ids, last_only=True)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        logits, past = model(nxt, past_key_values=past)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    return t1 - t0, (time.perf_counter() - t1) / (NEW_TOKENS - 1), NEW_TOKENS * ids.shape[0]


@torch.no_grad()
def hf_generate(model, ids: torch.Tensor, n: int) -> float:
    t = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return time.perf_counter() - t


def best(fn, repeats: int):
    """The fastest of `repeats` runs, figure by figure: this CPU is shared, so the least
    disturbed run is the most repeatable estimate."""
    runs = [fn() for _ in range(repeats)]
    return tuple(min(r[i] for r in runs) for i in range(len(runs[0])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpt2", action="store_true", help="also the 124M GPT-2-small shape")
    ap.add_argument(
        "--ttft", action="store_true", help="only the interleaved time-to-first-token table"
    )
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    try:
        if args.ttft:
            ttft_only(root, args.repeats)
            return
        run(root, args.repeats)
        if args.gpt2:
            gpt2(root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ttft_only(root: Path, repeats: int) -> None:
    from transformers import LlamaForCausalLM

    path, prompts, _ = build_model(root)
    tok = build_tokenizer("char", CORPUS.read_text())
    hf = LlamaForCausalLM.from_pretrained(path).eval()
    hf_generate(hf, torch.tensor([tok.encode(prompts[0]).ids]), 4)
    med, table = ttft_before_after(root, hf, tok, 2 * max(7, repeats))
    print(table)
    print(
        f"target: TTFT <= 0.5x (d): {med['a'] / med['d']:.2f}x (medians; before: "
        f"{med['before'] / med['d']:.2f}x without the prefill graph, "
        f"{med['nospin'] / med['d']:.2f}x without spinning)"
    )


def run(root: Path, repeats: int) -> None:
    from transformers import LlamaForCausalLM

    bandwidth = read_bandwidth_gbs()
    print(
        f"CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"memory read bandwidth {bandwidth:.1f} GB/s"
    )
    path, prompts, facts = build_model(root)
    text = CORPUS.read_text()
    tok = build_tokenizer("char", text)
    ids = [torch.tensor([tok.encode(p).ids]) for p in prompts]
    variants = {v["variant"]: v for v in facts["variants"]}
    # A prompt no path has seen, for each timed run: a repeated one would hit the server's
    # prefix cache and time a 64-token prefill as a 1-token one.
    unseen = (text[400_000 + 1_000 * i : 400_000 + 1_000 * i + PROMPT_TOKENS] for i in range(600))

    def fresh() -> str:
        return next(unseen)

    # (d) transformers: TTFT = generate 1 token; per token = (128 tokens - 1 token) / 127.
    hf = LlamaForCausalLM.from_pretrained(path).eval()
    hf_generate(hf, ids[0], 4)
    d_ttft = min(hf_generate(hf, ids[0], 1) for _ in range(repeats))
    d_full = min(hf_generate(hf, ids[0], NEW_TOKENS) for _ in range(repeats))
    d_tok = (d_full - d_ttft) / (NEW_TOKENS - 1)

    # (c) PyTorch eager.
    model, _ = load_pretrained(path)
    model.eval()
    torch_eager(model, ids[0])
    c_ttft, c_tok, _ = best(lambda: torch_eager(model, ids[0]), repeats)

    # (b) in-process engine, every variant; then intra-op threads 1 and 2 (served variant).
    async def engine_figures():
        engine = Engine(Settings(inference_device="cpu"), DirectoryResolver(root / "models"))
        out = {}
        for name in variants:
            await engine_stream(engine, prompts[0], name)
            runs = [await engine_stream(engine, fresh(), name) for _ in range(repeats)]
            out[name] = tuple(min(r[i] for r in runs) for i in range(2))
        await engine.close()
        threads = {}
        for n in (1, 2):
            settings = Settings(inference_device="cpu", inference_threads=n)
            engine = Engine(settings, DirectoryResolver(root / "models"))
            await engine_stream(engine, prompts[0], "")
            one = min([(await engine_stream(engine, prompts[0], ""))[1] for _ in range(repeats)])
            many = []
            for _ in range(repeats):
                t = time.perf_counter()
                done = await asyncio.gather(*[engine_stream(engine, p, "") for p in prompts[:16]])
                many.append(sum(r[2] for r in done) / (time.perf_counter() - t))
            threads[n] = (one, max(many))
            await engine.close()
        return out, threads

    b_figs, thread_figs = asyncio.run(engine_figures())

    # (a) gRPC, server process, default variant; concurrency; prefix reuse.
    proc, addr = start_server(root, max_batch_size=64)
    try:
        with grpc.insecure_channel(addr) as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(model="baby"))
            grpc_stream(stub, prompts[0])
            a_ttft, a_tok, a_n = best(lambda: grpc_stream(stub, fresh()), repeats)
            # Rounds over every concurrency, so a change of the machine's load between
            # points lands in every point alike; the median round per point.
            rounds: dict[int, list[float]] = {c: [] for c in CONCURRENCY}
            for _ in range(repeats):
                for c in CONCURRENCY:
                    rounds[c].append(grpc_concurrent(stub, prompts[:c]))
            a_conc = {c: float(np.median(r)) for c, r in rounds.items()}
            prefix = prefix_figures(stub, CORPUS.read_text(), max(15, repeats))
    finally:
        proc.terminate()
        proc.wait(30)
    med, ttft_table = ttft_before_after(root, hf, tok, 2 * max(7, repeats))
    costs = step_costs(path, list(variants))

    served = info.variant
    floor = {n: v["bytes"] / (bandwidth * 1e9) for n, v in variants.items()}
    print(
        f"\n2. batch 1: {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens "
        f"(best of {repeats}); x (d) = speed-up over transformers"
    )
    print(f"{'':44} {'TTFT ms':>8} {'/ (d)':>6} {'ms/token':>9} {'x (d)':>6} {'floor ms':>9}")
    rows = [(f"(a) gRPC GenerateStream, served: {served}", a_ttft, a_tok, floor[served])]
    rows += [(f"(b) Engine in-process, {n}", t, k, floor[n]) for n, (t, k) in b_figs.items()]
    rows += [
        ("(c) PyTorch eager + KV cache", c_ttft, c_tok, floor["fp32"]),
        ("(d) transformers generate (baseline)", d_ttft, d_tok, floor["fp32"]),
    ]
    for name, ttft, tok_s, fl in rows:
        print(
            f"{name:44} {ttft * 1e3:8.2f} {ttft / d_ttft:6.2f} {tok_s * 1e3:9.2f} "
            f"{d_tok / tok_s:6.2f} {fl * 1e3:9.2f}"
        )
    print(ttft_table)
    print(
        f"target: (a) >= 4x (d) per token: {d_tok / a_tok:.2f}x; "
        f"TTFT <= 0.5x (d): {med['a'] / med['d']:.2f}x (medians; before: "
        f"{med['before'] / med['d']:.2f}x without the prefill graph, "
        f"{med['nospin'] / med['d']:.2f}x without spinning)"
    )
    print("\nvariants (validation loss on the corpus' last tenth; gate: <= 1% over fp32)")
    print(
        f"{'':8} {'MB':>7} {'val loss':>9} {'vs fp32':>8} {'gate':>5} {'export ms/tok':>14} "
        f"{'prefill64 ms':>13}"
    )
    ref = variants["fp32"]["val_loss"]
    listed = dict(variants)
    if facts.get("prefill"):
        listed["prefill"] = facts["prefill"]
    for n, v in listed.items():
        print(
            f"{n:8} {v['bytes'] / 1e6:7.1f} {v['val_loss']:9.4f} {v['val_loss'] / ref - 1:+8.2%} "
            f"{'pass' if v['passes_quality_gate'] else 'FAIL':>5} {v['decode_ms_per_token']:14.2f} "
            f"{v.get('prefill_ms', float('nan')):13.2f}"
        )

    print("\nintra-op threads (in-process Engine, served variant)")
    for n, (one, many) in thread_figs.items():
        print(
            f"{n} thread(s): {one * 1e3:.2f} ms/token at batch 1, {many:.0f} tokens/s at 16 streams"
        )

    print(
        "\n3. aggregate tokens/s through gRPC (served variant; max_batch_size 64; median of "
        f"{repeats} rounds over all four)"
    )
    print("".join(f"{f'{c} streams':>16}" for c in CONCURRENCY))
    print("".join(f"{a_conc[c]:9.0f} ({a_conc[c] / a_conc[1]:4.1f}x)" for c in CONCURRENCY))
    print(f"target: 16 streams >= 8x one stream: {a_conc[16] / a_conc[1]:.1f}x")
    print_step_costs(costs, variants, served)
    print_scaling_bound(path, costs, served, variants)

    cold, warm, warm_lru, cached = prefix
    print("\n4. prefix reuse: 200-token shared prefix + 10 new tokens (time to first token)")
    print(
        f"cold {cold * 1e3:.2f} ms; reused from the request's slot {warm * 1e3:.2f} ms "
        f"({warm / cold:.2f}x of cold), copied in from the LRU {warm_lru * 1e3:.2f} ms "
        f"({warm_lru / cold:.2f}x); {cached} tokens reused; medians of {max(15, repeats)} "
        "interleaved (target <= 0.3x)"
    )
    itl = itl_figures(root, CORPUS.read_text())
    print(
        "\n5. inter-token latency of 8 running streams while a 1,000-token prompt arrives "
        f"(the gaps overlapping its prefill; {ITL_REPEATS} alternated runs each)"
    )
    for name, (p50, p99, worst) in itl.items():
        label = (
            f"chunked prefill ({PREFILL_CHUNK} per turn)"
            if name == "chunked"
            else "whole prompt at once"
        )
        print(
            f"{label:32} p50 {p50 * 1e3:7.2f} ms   p99 {p99 * 1e3:7.2f} ms   "
            f"max {worst * 1e3:7.2f} ms"
        )
    if a_n != NEW_TOKENS:
        print(f"note: the gRPC stream produced {a_n} tokens")


def print_step_costs(costs: dict, variants: dict, served: str) -> None:
    rows = sorted({B for _, B in costs})
    print(
        "\nONNX Runtime cost of one decode step (one intra-op thread, CPU ms; rows at 128 "
        "tokens), and its split by op type"
    )
    for name in variants:
        one = costs[name, rows[0]][0]
        cells = []
        for B in rows:
            ms, split = costs[name, B]
            mm = sum(v for k, v in split.items() if k.startswith("MatMul"))
            gqa = split.get("GroupQueryAttention", 0.0)
            cells.append(
                f"{B:2} rows {ms:6.2f} ms ({B * one / ms:4.1f}x rows/s; MatMul {mm:4.0%}, "
                f"attention {gqa:4.0%})"
            )
        print(f"{name:6}{' (served)' if name == served else '':9} " + "  ".join(cells))


def print_scaling_bound(path: Path, costs: dict, served: str, variants: dict) -> None:
    """The arithmetic that bounds 16 streams against one, per core (ORT's step costs above
    are one thread's)."""
    bandwidth, fp32, int8 = one_core_rates()
    rate = fp32 if served == "fp32" else int8  # int8/int4 graphs compute in int8
    cfg = json.loads((path / "config.json").read_text())
    L, d, n_layers = 128, cfg["hidden_size"], cfg["num_hidden_layers"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cache_head_dim(cfg.get("head_dim", d // cfg["num_attention_heads"]))
    params = sum(
        v.numel() for k, v in load_pretrained(path)[0].state_dict().items() if "embed" not in k
    )
    flops = 2 * params + 4 * n_layers * d * L  # per token: the matmuls, then QK and AV
    kv = 2 * n_layers * kv_heads * head_dim * L * 4  # fp32 keys and values read per row
    weights = variants[served]["bytes"]
    print(
        f"\nwhat bounds 16 streams against one ({served}, rows at {L} tokens), per core: "
        f"{bandwidth:.1f} GB/s read, fp32 GEMM {fp32:.0f} GFLOP/s, int8 GEMM {int8:.0f} GOP/s "
        "measured"
    )
    floor = {}
    for B in (1, 16, 64):
        mem = (weights + B * kv) / (bandwidth * 1e9)
        comp = B * flops / (rate * 1e9)
        floor[B] = max(mem, comp)
        print(
            f"  {B:2} rows: {B * flops / 1e6:7.1f} MFLOP, {(weights + B * kv) / 1e6:6.1f} MB "
            f"(weights {weights / 1e6:.1f} + cache {B * kv / 1e6:.1f}): floor "
            f"{floor[B] * 1e3:.2f} ms (memory {mem * 1e3:.2f}, compute {comp * 1e3:.2f}); "
            f"ORT measured {costs[served, B][0]:.2f} ms"
        )
    t1, t16 = costs[served, 1][0] * 1e-3, costs[served, 16][0] * 1e-3
    print(
        f"  16 rows / 1 row, tokens/s: {16 * floor[1] / floor[16]:.1f}x with both at their "
        f"floors; {16 * t1 / floor[16]:.1f}x with 16 rows at theirs against one row as "
        f"measured; {16 * t1 / t16:.1f}x as measured"
    )


def itl_figures(root: Path, text: str) -> dict[str, tuple[float, float, float]]:
    """p50, p99 and max inter-token gap (s) of 8 running streams while a 1,000-token prompt
    arrives (the gaps overlapping its prefill, from its arrival to its first token), with
    chunked prefill and with the whole prompt prefilled at once (ITL_REPEATS runs of each,
    alternated, gaps pooled). Counting every gap of the streams' lives instead buries the
    whole prefill's one stall per stream below p99's reach."""
    long_dir = root / "models" / "baby-long"
    if not long_dir.exists():
        shutil.copytree(root / "models" / "baby", long_dir)
        for name in ("variants.json", "model_int8.onnx", "model_int4.onnx"):
            (long_dir / name).unlink(missing_ok=True)
        cfg = json.loads((long_dir / "config.json").read_text())
        cfg["max_position_embeddings"] = 2048  # rotary positions: any length runs
        (long_dir / "config.json").write_text(json.dumps(cfg))
        export_onnx(long_dir, variants=())  # the graph's rotary tables cover 2,048 positions
    long_prompt = text[200_000:201_000]

    async def one(chunked: bool) -> list[float]:
        engine = Engine(Settings(inference_device="cpu"), DirectoryResolver(root / "models"))
        await engine.complete("default", "baby-long", "A", SamplingParams(max_new_tokens=1))
        (loaded,) = engine._loaded.values()
        if not chunked:
            loaded.scheduler.prefill_chunk = 1 << 30
        spans: list[tuple[float, float]] = []
        window = [float("inf"), float("inf")]  # the long prompt's arrival and first token

        async def stream(i: int) -> None:
            params = SamplingParams(max_new_tokens=150, temperature=0)
            prompt = text[i * 500 : i * 500 + 64]
            last = None
            async for _ in engine.generate("default", "baby-long", prompt, params):
                now = time.perf_counter()
                if last is not None:
                    spans.append((last, now))
                last = now

        async def arrival() -> None:
            await asyncio.sleep(0.3)
            window[0] = time.perf_counter()
            params = SamplingParams(max_new_tokens=1)
            await engine.complete("default", "baby-long", long_prompt, params)
            window[1] = time.perf_counter()

        await asyncio.gather(*[stream(i) for i in range(8)], arrival())
        await engine.close()
        # The gaps that overlap the long prompt's prefill: what its arrival did to the others.
        return [b - a for a, b in spans if b > window[0] and a < window[1]]

    pooled: dict[str, list[float]] = {"chunked": [], "whole": []}
    for _ in range(ITL_REPEATS):
        for name in pooled:
            pooled[name] += asyncio.run(one(name == "chunked"))
    return {
        name: (float(np.percentile(g, 50)), float(np.percentile(g, 99)), max(g))
        for name, g in pooled.items()
    }


def ttft_before_after(root: Path, hf, tok, reps: int) -> tuple[dict[str, float], str]:
    """Time to first token, interleaved: (a) the server as it serves (prompts of a quantised
    variant through the w8a8 prefill graph), (a') the same with the prefill graph off (the
    before), (d) transformers. Returns the medians (s) and the table to print."""
    # Default settings, as a user's server runs (max_batch_size 16: a 64-slot cache cost
    # about 1.3 ms more server-side time to first token, measured, cause not found).
    proc, addr = start_server(root)
    proc2, addr2 = start_server(root, inference_prefill_graph=False)
    proc3, addr3 = start_server(root, inference_spin=False)
    try:
        with (
            grpc.insecure_channel(addr) as ch,
            grpc.insecure_channel(addr2) as ch2,
            grpc.insecure_channel(addr3) as ch3,
        ):
            stubs = {
                "a": inference_pb2_grpc.InferenceServiceStub(ch),
                "before": inference_pb2_grpc.InferenceServiceStub(ch2),
                "nospin": inference_pb2_grpc.InferenceServiceStub(ch3),
            }
            req = inference_pb2.GetModelInfoRequest(model="baby")
            info, info2, _ = (stub.GetModelInfo(req) for stub in stubs.values())
            for stub in stubs.values():
                grpc_stream(stub, CORPUS.read_text()[:PROMPT_TOKENS], n=2)  # loads the model
            rss = {"a": rss_mb(proc.pid), "before": rss_mb(proc2.pid)}
            load = os.getloadavg()
            ttft = ttft_interleaved(stubs, hf, tok, CORPUS.read_text(), reps)
            load = (load, os.getloadavg())
    finally:
        for pr in (proc, proc2, proc3):
            pr.terminate()
            pr.wait(30)
    served = info.variant
    med = {k: float(np.median(v)) for k, v in ttft.items()}
    graph = f"the prefill graph ({info.prefill.variant})" if info.HasField("prefill") else None
    labels = {
        "a": f"(a) gRPC, {served}, prompt through {graph or f'{served} (no prefill graph)'}",
        "before": f"(a') gRPC, {info2.variant}, prompt through {info2.variant} (before)",
        "nospin": "(a'') as (a), ORT threads never spinning (inference_spin=0)",
        "d": "(d) transformers generate",
    }
    lines = [
        f"\ntime to first token, {PROMPT_TOKENS}-token prompt, a new one each: median of "
        f"{len(ttft['a'])} interleaved repetitions (load average {load[0][0]:.2f} before, "
        f"{load[1][0]:.2f} after)",
        f"{'':64} {'median ms':>9} {'range ms':>15} {'/ (d)':>6}",
    ]
    for k, label in labels.items():
        lo, hi = min(ttft[k]) * 1e3, max(ttft[k]) * 1e3
        lines.append(
            f"{label:64} {med[k] * 1e3:9.2f} {f'{lo:.2f}-{hi:.2f}':>15} {med[k] / med['d']:6.2f}"
        )
    if info.HasField("prefill"):
        lines.append(
            f"prefill graph: {info.prefill.bytes / 1e6:.1f} MB file, loaded once per model "
            f"(server RSS {rss['a']:.0f} MB with it, {rss['before']:.0f} MB without); "
            f"val loss {info.prefill.val_loss:.4f}, "
            f"gate {'pass' if info.prefill.passes_quality_gate else 'FAIL'}"
        )
    return med, "\n".join(lines)


def ttft_interleaved(stubs: dict, hf, tok, text: str, repeats: int) -> dict[str, list[float]]:
    """Time to first token (s) of each gRPC server in `stubs` and of (d) transformers for a
    64-token prompt, interleaved (the order rotates each repetition); each repetition on a
    prompt new to all, so no server's prefix cache serves it."""
    out: dict[str, list[float]] = {k: [] for k in [*stubs, "d"]}
    order = list(out)
    for r in range(repeats):
        prompt = text[300_000 + 1_000 * r : 300_000 + 1_000 * r + PROMPT_TOKENS]
        ids = torch.tensor([tok.encode(prompt).ids])
        assert ids.shape[1] == PROMPT_TOKENS
        for k in order[r % len(order) :] + order[: r % len(order)]:
            # Settle first: right after a transformers call, this process's OpenMP threads
            # still spin-wait and take a core from the server's prefill.
            time.sleep(0.05)
            if k == "d":
                out[k].append(hf_generate(hf, ids, 1))
            else:
                out[k].append(grpc_stream(stubs[k], prompt, n=1)[0])
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` (MB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def step_costs(path: Path, variants: list[str], rows=(1, 16, 64), length: int = 128) -> dict:
    """What one decode step costs ONNX Runtime, per variant and batch size: CPU ms (one
    intra-op thread, so the calling thread's CPU time is the whole cost, whatever else this
    machine runs) and its split by op type (ORT's profiler), rows at `length` tokens."""
    import onnxruntime as ort

    from lmforge_server.inference.session import SlotGraph

    out = {}
    for name in variants:
        file = {"fp32": "model.onnx"}.get(name, f"model_{name}.onnx")
        for B in rows:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.log_severity_level = 3
            so.enable_profiling = True
            so.profile_file_prefix = str(path.parent / f"profile-{name}-{B}")
            graph = SlotGraph(
                ort.InferenceSession(str(path / file), so, providers=["CPUExecutionProvider"])
            )
            cache = graph.new_cache(B, 256)
            ids = np.random.default_rng(0).integers(0, 60, (B, length - 1))
            graph.run(cache, ids, np.full(B, length - 2, np.int32))
            one = np.ones((B, 1), np.int64)
            lens = np.full(B, length - 1, np.int32)
            graph.run(cache, one, lens)
            steps = max(5, 80 // B)
            t = time.thread_time()
            for _ in range(steps):
                graph.run(cache, one, lens)
            cpu_ms = (time.thread_time() - t) / steps * 1e3
            profile = Path(graph.session.end_profiling())
            events = json.loads(profile.read_text())
            profile.unlink()
            runs = [e for e in events if e.get("name") == "model_run"]
            start = runs[1]["ts"] + runs[1]["dur"]  # after the prefill and the warm-up step
            ops: dict[str, float] = {}
            for e in events:
                if (
                    e.get("cat") == "Node"
                    and e["name"].endswith("_kernel_time")
                    and e["ts"] >= start
                ):
                    op = e["args"]["op_name"]
                    ops[op] = ops.get(op, 0.0) + e["dur"]
            total = sum(ops.values()) or 1.0
            out[name, B] = (cpu_ms, {k: v / total for k, v in ops.items()})
    return out


def prefix_figures(stub, text: str, repeats: int) -> tuple[float, float, float, int]:
    """(cold TTFT s, TTFT s with the prefix still in the request's slot, TTFT s with the
    prefix copied in from the LRU, tokens reused), medians of `repeats` interleaved
    repetitions, each on a prefix of its own. Requests one after another run in the same
    slot: the second prompt sharing the prefix finds it there (a conversation's next turn);
    an unrelated prompt in between takes the slot, and the third finds it in the LRU."""

    def ttft(prompt: str) -> tuple[float, int]:
        req = inference_pb2.GenerateRequest(
            model="baby",
            prompt=prompt,
            sampling=inference_pb2.SamplingParams(max_new_tokens=1, temperature=0),
        )
        t = time.perf_counter()
        resp = stub.Generate(req, timeout=60)
        return time.perf_counter() - t, resp.cached_prompt_tokens

    colds, slots, lrus, cached = [], [], [], 0
    for r in range(repeats):
        base = 100_000 + 5_000 * r
        prefix = text[base : base + 200]
        colds.append(ttft(text[base + 1000 : base + 1210])[0])  # nothing shared
        ttft(prefix + text[base + 300 : base + 310])  # the first prompt with this prefix
        t, cached = ttft(prefix + text[base + 400 : base + 410])
        slots.append(t)
        ttft(text[base + 2000 : base + 2064])  # takes the slot
        t, lru_cached = ttft(prefix + text[base + 500 : base + 510])
        assert lru_cached >= 200, lru_cached
        lrus.append(t)
    return float(np.median(colds)), float(np.median(slots)), float(np.median(lrus)), cached


def gpt2(root: Path, repeats: int) -> None:
    """GPT-2-small shape at batch 1: fp32, int8, int4 against the weight-bandwidth floor."""
    cfg = specs.ModelConfig(
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        d_model=768,
        intermediate_size=2048,
        context_length=1024,
        vocab_size=50257,
        tokenizer="byte",
    )
    torch.manual_seed(0)
    model = Llama(cfg)
    path = root / "models" / "gpt2"
    save_pretrained(model, path)
    t = time.perf_counter()
    facts = export_onnx(path, variants=("int8", "int4"))  # speed only: no quality gate here
    bandwidth = read_bandwidth_gbs()
    print(
        f"\n6. GPT-2-small shape: {model.num_parameters() / 1e6:.1f}M parameters, export "
        f"{time.perf_counter() - t:.0f}s; bandwidth {bandwidth:.1f} GB/s"
    )
    print(f"{'':8} {'MB':>7} {'floor ms':>9} {'ms/token':>9} {'/ floor':>8} {'vs fp32':>8}")
    figs = {}
    for v in facts["variants"]:
        figs[v["variant"]] = min(
            decode_ms_per_token(path / v["file"], cfg, steps=64) for _ in range(repeats)
        )
    for v in facts["variants"]:
        n, fl = v["variant"], v["bytes"] / (bandwidth * 1e9) * 1e3
        print(
            f"{n:8} {v['bytes'] / 1e6:7.1f} {fl:9.2f} {figs[n]:9.2f} {figs[n] / fl:8.2f} "
            f"{figs['fp32'] / figs[n]:7.2f}x"
        )
    print("targets: fp32 within 1.3x of its floor; int8 >= 1.6x faster than fp32")
    print(json.dumps({k: round(v, 3) for k, v in figs.items()}))


if __name__ == "__main__":
    main()
