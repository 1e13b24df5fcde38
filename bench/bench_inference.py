"""Inference latency and throughput on the CPU (not a CI test).

A `baby`-sized model (6 x 384, ~10.7M parameters, random weights, char tokenizer from the
bundled corpus), exported to ONNX once. Batch 1: time to first token for a 64-token
prompt and per-token decode latency over 128 tokens for
  (a) GenerateStream through gRPC, the server in a separate process,
  (b) the same ONNX model in-process through the Engine,
  (c) PyTorch eager with a KV cache,
  (d) transformers `generate` (the reference every figure is divided by);
then aggregate tokens/s at 1, 4 and 16 concurrent streams, plus the engine with batching
off (max_batch_size=1) to show what batching the decode steps buys.

    python bench/bench_inference.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
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
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmforge.v1 import inference_pb2, inference_pb2_grpc
from lmforge_server import specs
from lmforge_server.inference.engine import Engine
from lmforge_server.inference.resolver import DirectoryResolver
from lmforge_server.inference.sampling import SamplingParams
from lmforge_server.settings import Settings
from lmforge_worker.export import export_onnx
from lmforge_worker.model import Llama, load_pretrained, save_pretrained
from lmforge_worker.tokenization import build_tokenizer, save_tokenizer

CORPUS = Path(specs.__file__).parent / "data" / "tinyshakespeare.txt"
PROMPT_TOKENS, NEW_TOKENS = 64, 128
CONCURRENCY = (1, 4, 16)


def build_model(root: Path) -> tuple[Path, list[str]]:
    text = CORPUS.read_text()
    tok = build_tokenizer("char", text)
    spec = specs.resolve("baby", {}, {}, num_distinct_chars=len(set(text)))
    torch.manual_seed(0)
    model = Llama(spec.model)
    path = root / "models" / "baby"
    save_pretrained(model, path)
    save_tokenizer(tok, path / "tokenizer.json")
    t = time.perf_counter()
    facts = export_onnx(path)
    print(
        f"model: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{spec.model.n_layers}x{spec.model.d_model}, vocab {spec.model.vocab_size}; "
        f"export {time.perf_counter() - t:.1f}s, parity {facts['max_abs_diff']:.2e}"
    )
    # 64-character (= 64-token) prompts from the corpus, distinct per stream.
    prompts = [text[i * 1000 : i * 1000 + PROMPT_TOKENS] for i in range(1, 17)]
    assert all(len(tok.encode(p).ids) == PROMPT_TOKENS for p in prompts)
    return path, prompts


# --- (a) gRPC, server in another process ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifacts: Path) -> tuple[subprocess.Popen, str]:
    addr = f"127.0.0.1:{free_port()}"
    settings = Settings(artifacts=str(artifacts), inference_addr=addr, inference_device="cpu")
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
    for msg in stub.GenerateStream(req, timeout=300):
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


# --- (b) the engine in-process ------------------------------------------------------------------


async def engine_stream(engine: Engine, prompt: str) -> tuple[float, float, int]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0)
    t0 = time.perf_counter()
    first = last = None
    count = 0
    async for d in engine.generate("default", "baby", prompt, params):
        if d.token_ids:
            now = time.perf_counter()
            first = first or now
            last = now
            count += len(d.token_ids)
    return first - t0, (last - first) / max(1, count - 1), count


async def engine_concurrent(engine: Engine, prompts: list[str]) -> float:
    t = time.perf_counter()
    results = await asyncio.gather(*[engine_stream(engine, p) for p in prompts])
    return sum(r[2] for r in results) / (time.perf_counter() - t)


# --- (c) PyTorch eager with a KV cache, (d) transformers ---------------------------------------


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
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    try:
        run(root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, repeats: int) -> None:
    from transformers import LlamaForCausalLM

    path, prompts = build_model(root)
    tok = build_tokenizer("char", CORPUS.read_text())
    ids = [torch.tensor([tok.encode(p).ids]) for p in prompts]
    print(f"CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}\n")

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

    # (b) in-process engine.
    settings = Settings(inference_device="cpu", max_batch_size=16)

    async def engine_figures():
        engine = Engine(settings, DirectoryResolver(root / "models"))
        await engine_stream(engine, prompts[0])
        single = [await engine_stream(engine, prompts[0]) for _ in range(repeats)]
        conc = {}
        for c in CONCURRENCY:
            conc[c] = max([await engine_concurrent(engine, prompts[:c]) for _ in range(repeats)])
        await engine.close()
        unbatched = Engine(
            Settings(inference_device="cpu", max_batch_size=1), DirectoryResolver(root / "models")
        )
        await engine_stream(unbatched, prompts[0])
        nobatch = {
            c: max([await engine_concurrent(unbatched, prompts[:c]) for _ in range(repeats)])
            for c in (4, 16)
        }
        await unbatched.close()
        return tuple(min(s[i] for s in single) for i in range(3)), conc, nobatch

    (b_ttft, b_tok, b_n), b_conc, b_nobatch = asyncio.run(engine_figures())
    assert b_n == NEW_TOKENS, f"the engine stopped early ({b_n} tokens)"

    # (a) gRPC, server process.
    proc, addr = start_server(root)
    try:
        with grpc.insecure_channel(addr) as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            grpc_stream(stub, prompts[0])
            a_ttft, a_tok, a_n = best(lambda: grpc_stream(stub, prompts[0]), repeats)
            a_conc = {}
            for c in CONCURRENCY:
                a_conc[c] = max(grpc_concurrent(stub, prompts[:c]) for _ in range(repeats))
    finally:
        proc.terminate()
        proc.wait(30)

    # Aggregate tokens/s of the references: one batch of c prompts (all 64 tokens).
    d_conc, c_conc = {}, {}
    for c in CONCURRENCY:
        batch = torch.cat(ids[:c])
        d_conc[c] = c * NEW_TOKENS / min(hf_generate(hf, batch, NEW_TOKENS) for _ in range(repeats))
        c_conc[c] = min(
            c * NEW_TOKENS / (t + k * (NEW_TOKENS - 1))
            for t, k, _ in [torch_eager(model, batch) for _ in range(repeats)]
        )

    print(f"batch 1: {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens (best of {repeats})")
    print(f"{'':40} {'TTFT ms':>9} {'x (d)':>7} {'ms/token':>9} {'x (d)':>7}")
    rows = [
        ("(a) gRPC GenerateStream (server process)", a_ttft, a_tok),
        ("(b) ONNX Runtime in-process (Engine)", b_ttft, b_tok),
        ("(c) PyTorch eager + KV cache", c_ttft, c_tok),
        ("(d) transformers generate", d_ttft, d_tok),
    ]
    for name, ttft, tok_s in rows:
        print(
            f"{name:40} {ttft * 1e3:9.2f} {ttft / d_ttft:7.2f} {tok_s * 1e3:9.2f} {tok_s / d_tok:7.2f}"
        )
    print("\naggregate tokens/s (ratio to (d) at the same concurrency)")
    print(f"{'':40}" + "".join(f"{f'{c} streams':>18}" for c in CONCURRENCY))
    table = [
        ("(a) gRPC GenerateStream", a_conc),
        ("(b) Engine, batched decode", b_conc),
        ("(b') Engine, max_batch_size=1", {1: b_conc[1], **b_nobatch}),
        ("(c) PyTorch eager, one batch", c_conc),
        ("(d) transformers generate, one batch", d_conc),
    ]
    for name, figs in table:
        cells = "".join(f"{figs[c]:10.0f} ({figs[c] / d_conc[c]:4.2f}x)" for c in CONCURRENCY)
        print(f"{name:40}{cells}")
    if a_n != NEW_TOKENS:
        print(f"note: the gRPC stream produced {a_n} tokens")


if __name__ == "__main__":
    main()
