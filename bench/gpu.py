"""lmforge on a GPU, in one command: the CUDA tests, training throughput and MFU, the Tiny
Shakespeare GPU recipe through the service, and CUDA inference; writes a report.

    python bench/gpu.py --out bench/out/gpu              # on a machine with a CUDA GPU
    python bench/gpu.py --dry-run --out bench/out/dry    # the same steps, tiny sizes, on the CPU

Phases (`--only tests,throughput` runs some; each one's figures replace its entry in
`<out>/report.json`, so phases run in separate calls add up to one report):
  tests       pytest -m gpu tests/test_gpu.py (bf16/fp16 autocast, fused AdamW, compile on/off,
              fp16 ONNX parity, CUDA provider with IO binding, a whole job through the service)
  throughput  the GPT-2-small shape (124M, context 1024, batch 16) through lmforge's training
              loop, bf16 with and without torch.compile: tokens/s and MFU against the GPU's
              datasheet bf16 peak and against a bf16 matrix product measured here
  recipe      nanoGPT's char-level Tiny Shakespeare GPU recipe (6x6x384, context 256, batch
              64, 5,000 steps, lr 1e-3 -> 1e-4, dropout 0.2) as a job through the running
              service (API, Redis, Celery worker, inference server): best val loss and wall time
              beside nanoGPT's 1.4697 and 147 s
  inference   a random-weight 124M model exported to ONNX (fp32 + fp16), served by the engine
              on CUDA (fp16, IO binding): TTFT, batch-1 decode ms/token, tokens/s at 1/16/64
              streams, beside PyTorch eager (fp16, KV cache) on the same GPU
The report is `<out>/report.md` and `<out>/report.json` (plus the tests' junit XML and log).
`--dry-run` runs every phase on the CPU at tiny sizes, so the script itself is proven here.

On the lent GPU machine (../shared/gpu/README.md): from the project root here run
`../shared/gpu/prepare-carry.sh pytest-timeout` (from a plain clone: in a git worktree, where
.git is a file, its first line stops it; 7 batches as of 2026-11-26), carry each `.gpu-carry/batch-K` in one device
call (`mkdir -p /tmp/gpu-carry && cp .gpu-carry/batch-K/* /tmp/gpu-carry/`), then, with
`.gpu-carry/install.sh` carried in the last one, run one phase per call (a call runs at most
10 minutes; the report in /tmp/lmforge-gpu grows call by call while the machine stays warm):
    bash .gpu-carry/install.sh    # once, in the call that carries the last batch
    export PYTHONPATH=/tmp/site:$PWD/sdk:$PWD/server:$PWD/worker    # in every call
    python3 bench/gpu.py --only tests --out /tmp/lmforge-gpu; cp /tmp/lmforge-gpu/* $OUT/
    (then --only throughput, --only recipe, --only inference, the same way; README.md's
    performance section has each call's exact command)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lmforge import Client, ModelSpec, TrainingSpec
from lmforge_server import specs
from lmforge_server.settings import Settings
from lmforge_server.stack import BUNDLED_CORPUS, Stack

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("tests", "throughput", "recipe", "inference")

# What the figures are printed beside: nanoGPT on an H200 (KNOWN.md) and the targets.
NANOGPT_MFU = 0.42
NANOGPT_TOKENS_PER_S = {"compile": 487_000, "eager": 390_000}
NANOGPT_RECIPE = {"best_val_loss": 1.4697, "wall_seconds": 147.0}
TARGETS = {"mfu": 0.50, "best_val_loss": 1.47, "wall_seconds": 147.0, "decode_ms_per_token": 1.0}

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, by a fragment of the GPU's
# name, first match wins; --peak-tflops overrides.
DATASHEET_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    device: str
    # Training threads on the CPU (0: torch's default); 1 keeps a loaded CPU from thrashing.
    torch_threads: int
    # throughput: overrides of the gpt2-small preset, and the runs to time
    tp_model: dict[str, Any]
    tp_training: dict[str, Any]
    tp_runs: tuple[tuple[str, dict[str, Any]], ...]
    tp_skip_steps: int  # compile and warm-up steps left out of the timing
    matmul: tuple[int, torch.dtype]
    # recipe
    recipe_model: dict[str, Any]
    recipe_training: dict[str, Any]
    # inference: overrides of the gpt2-small preset
    inf_model: dict[str, Any]
    prompt_tokens: int
    new_tokens: int
    streams: tuple[int, ...]
    repeats: int


GPU = Sizes(
    device="cuda",
    torch_threads=0,
    tp_model=dict(tokenizer="bpe", vocab_size=50304, dropout=0.0),
    tp_training=dict(
        max_steps=120,
        batch_size=16,
        grad_accum_steps=1,
        warmup_steps=10,
        eval_interval=120,
        eval_batches=2,
        checkpoint_interval=10_000,
        log_interval=10,
    ),
    tp_runs=(
        ("bf16, compiled", dict(precision="bf16", compile="on")),
        ("bf16, eager", dict(precision="bf16", compile="off")),
    ),
    tp_skip_steps=20,
    matmul=(8192, torch.bfloat16),
    recipe_model=dict(
        n_layers=6, n_heads=6, d_model=384, context_length=256, tokenizer="char", dropout=0.2
    ),
    recipe_training=dict(
        max_steps=5000,
        batch_size=64,
        learning_rate=1e-3,
        min_learning_rate=1e-4,
        warmup_steps=100,
        weight_decay=0.1,
        beta2=0.99,
        grad_clip=1.0,
        eval_interval=250,
        eval_batches=200,  # nanoGPT's eval_iters
        checkpoint_interval=1000,
        precision="bf16",
        compile="on",
    ),
    inf_model=dict(tokenizer="bpe", vocab_size=50304),
    prompt_tokens=64,
    new_tokens=128,
    streams=(1, 16, 64),
    repeats=3,
)

DRY = Sizes(
    device="cpu",
    torch_threads=1,
    tp_model=dict(
        n_layers=2, n_heads=2, d_model=64, context_length=64, tokenizer="bpe", vocab_size=512
    ),
    tp_training=dict(
        max_steps=30,
        batch_size=4,
        warmup_steps=5,
        eval_interval=30,
        eval_batches=2,
        checkpoint_interval=10_000,
        log_interval=5,
    ),
    tp_runs=(("fp32, eager", dict(precision="auto", compile="auto")),),
    tp_skip_steps=10,
    matmul=(512, torch.float32),
    recipe_model=dict(
        n_layers=2, n_heads=2, d_model=64, context_length=64, tokenizer="char", dropout=0.2
    ),
    recipe_training=dict(
        max_steps=40,
        batch_size=8,
        learning_rate=1e-3,
        min_learning_rate=1e-4,
        warmup_steps=5,
        beta2=0.99,
        eval_interval=20,
        eval_batches=4,
        checkpoint_interval=1000,
    ),
    inf_model=dict(
        n_layers=2, n_heads=2, d_model=64, context_length=256, tokenizer="bpe", vocab_size=512
    ),
    prompt_tokens=16,
    new_tokens=16,
    streams=(1, 4),
    repeats=2,
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- the machine ------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    import onnxruntime as ort

    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "device": device,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else "?"
    return env


def datasheet_peak(gpu: str) -> float | None:
    """Dense bf16 peak FLOP/s for a GPU name, or None when the table lacks it."""
    for fragment, tflops in DATASHEET_BF16_TFLOPS:
        if fragment in gpu:
            return tflops * 1e12
    return None


def matmul_rate(device: str, n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product on random data (mean of `repeats` after 3)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t)


# --- 1. the CUDA tests -------------------------------------------------------------------------


def phase_tests(sizes: Sizes, work: Path, out: Path, args) -> dict[str, Any]:
    xml = out / "gpu-tests.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rA",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        "tests/test_gpu.py",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.tests_timeout)
    log = proc.stdout + proc.stderr
    (out / "gpu-tests.log").write_text(log)
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                detail = (node.get("message") or "").strip()[:300]
        cases.append(
            {
                "test": case.get("name"),
                "outcome": outcome,
                "seconds": round(float(case.get("time", 0)), 2),
                "detail": detail,
            }
        )
    tail = [line for line in log.strip().splitlines() if line.strip()]
    return {
        "command": "python -m pytest " + " ".join(cmd[3:]),
        "returncode": proc.returncode,
        "summary": tail[-1] if tail else "",
        "cases": cases,
    }


# --- 2. training throughput and MFU ------------------------------------------------------------


class _Clock:
    """Training hooks that note when each logged step ended (the loop syncs the GPU there)."""

    def __init__(self):
        self.marks: list[tuple[int, float]] = []
        self.logs: list[str] = []

    def should_stop(self):
        return None

    def on_progress(self, p) -> None:
        self.marks.append((p.step, time.perf_counter()))

    def on_eval(self, *args) -> None:
        pass

    def on_checkpoint(self, step, path) -> None:
        pass

    def on_log(self, message: str) -> None:
        self.logs.append(message)


def phase_throughput(sizes: Sizes, work: Path, out: Path, args) -> dict[str, Any]:
    from lmforge_worker.training import train

    text = BUNDLED_CORPUS.read_text()
    n, dtype = sizes.matmul
    measured = matmul_rate(sizes.device, n, dtype)
    gpu = torch.cuda.get_device_name(0) if sizes.device == "cuda" else ""
    peak = args.peak_tflops * 1e12 if args.peak_tflops else datasheet_peak(gpu)
    result: dict[str, Any] = {
        "peak_flops": peak,
        "peak_source": (
            "--peak-tflops"
            if args.peak_tflops
            else f"datasheet dense bf16 for {gpu}"
            if peak
            else "none known for this device (pass --peak-tflops)"
        ),
        "measured_matmul_flops": measured,
        "measured_matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} on random data",
        "runs": [],
    }
    for label, overrides in sizes.tp_runs:
        spec = specs.resolve(
            "gpt2-small",
            sizes.tp_model,
            {**sizes.tp_training, **overrides},
            num_distinct_chars=len(set(text)),
        )
        clock = _Clock()
        run_dir = work / "throughput" / label.replace(", ", "-")
        train(
            spec,
            BUNDLED_CORPUS,
            work / "throughput" / "shared",  # token bins built once, reused by every run
            run_dir / "checkpoints",
            clock,
            device=sizes.device,
            torch_threads=sizes.torch_threads,
        )
        timed = [(s, t) for s, t in clock.marks if s >= sizes.tp_skip_steps]
        (s0, t0), (s1, t1) = timed[0], timed[-1]
        t = spec.training
        tokens_per_step = t.batch_size * t.grad_accum_steps * spec.model.context_length
        tps = (s1 - s0) * tokens_per_step / (t1 - t0)
        flops_per_token = specs.count_parameters(spec.model).flops_per_token
        result["runs"].append(
            {
                "run": label,
                "loop": clock.logs[0] if clock.logs else "",
                "parameters": specs.count_parameters(spec.model).total,
                "batch": f"{t.batch_size}x{spec.model.context_length}",
                "timed_steps": f"{s0}-{s1}",
                "tokens_per_second": tps,
                "flops_per_token": flops_per_token,
                "mfu": flops_per_token * tps / peak if peak else None,
                "fraction_of_measured_matmul": flops_per_token * tps / measured,
            }
        )
        shutil.rmtree(run_dir, ignore_errors=True)
        if sizes.device == "cuda":
            torch.cuda.empty_cache()
    return result


# --- 3. the Tiny Shakespeare recipe through the service ----------------------------------------


def phase_recipe(sizes: Sizes, work: Path, out: Path, args) -> dict[str, Any]:
    settings = Settings(
        data_dir=work / "stack",
        api_addr="127.0.0.1:0",
        inference_addr="127.0.0.1:0",
        device=sizes.device,
        inference_device=sizes.device,
        torch_threads=sizes.torch_threads,
    )
    with Stack(settings) as stack:
        client = Client(api_addr=stack.api_addr, inference_addr=stack.inference_addr)
        with client:
            dataset = client.datasets.upload(BUNDLED_CORPUS)
            t0 = time.monotonic()
            job = client.jobs.create(
                dataset=dataset,
                preset="baby",
                model=ModelSpec(**sizes.recipe_model),
                training=TrainingSpec(**sizes.recipe_training),
                model_name="shakespeare-char",
            )
            evals, logs, passed_at = [], [], None
            for event in client.jobs.watch(job.id):
                if event.type == "EVAL":
                    since = round(time.monotonic() - t0, 1)
                    evals.append((event.progress.step, event.progress.val_loss, since))
                    if passed_at is None and event.progress.val_loss <= TARGETS["best_val_loss"]:
                        passed_at = (event.progress.step, since)
                elif event.type == "LOG":
                    logs.append(event.message)
            wall = time.monotonic() - t0
            job = client.jobs.get(job.id)
            result: dict[str, Any] = {
                "state": str(job.state),
                "job_error": job.error,
                "device": job.device,
                "parameters": job.parameters.total,
                "spec": {
                    "model": dataclasses.asdict(job.spec.model),
                    "training": dataclasses.asdict(job.spec.training),
                },
                "loop": next((m for m in logs if m.startswith("training ")), ""),
                "best_val_loss": job.progress.best_val_loss,
                "best_step": job.progress.best_step,
                "val_bits_per_byte": job.progress.val_bits_per_byte,
                "training_seconds": job.progress.elapsed_seconds,
                "wall_seconds": wall,
                "first_eval_at_or_below_target": passed_at,
                "evals": evals,
                "tokens_per_second": job.progress.tokens_per_second,
            }
            if str(job.state) == "SUCCEEDED":
                info = client.models.info("shakespeare-char")
                done = client.generate(
                    "shakespeare-char", "ROMEO:\n", max_tokens=200, temperature=0.8, seed=1
                )
                result["served_by"] = f"{info.execution_provider} ({info.dtype})"
                result["sample"] = "ROMEO:\n" + done.text
    return result


# --- 4. inference ------------------------------------------------------------------------------


def _build_inference_model(sizes: Sizes, root: Path) -> tuple[Path, list[list[int]], Any]:
    from lmforge_worker.export import export_onnx
    from lmforge_worker.model import Llama, save_pretrained
    from lmforge_worker.tokenization import build_tokenizer, save_tokenizer

    text = BUNDLED_CORPUS.read_text()
    spec = specs.resolve("gpt2-small", sizes.inf_model, {}, num_distinct_chars=len(set(text)))
    tok = build_tokenizer("bpe", text, vocab_size=spec.model.vocab_size)
    torch.manual_seed(0)
    model = Llama(spec.model)
    path = root / "models" / "bench"
    save_pretrained(model, path, eos_token_id=tok.get_vocab_size() - 1)
    save_tokenizer(tok, path / "tokenizer.json")
    facts = export_onnx(path, fp16=sizes.device == "cuda")
    ids = tok.encode(text).ids
    n = sizes.prompt_tokens
    prompts = [ids[i * 997 : i * 997 + n] for i in range(1, max(sizes.streams) + 1)]
    return path, prompts, (model, tok, facts)


@torch.no_grad()
def _torch_decode(model, ids: torch.Tensor, new: int, device: str) -> tuple[float, float]:
    """(time to first token s, decode s per token) of greedy decoding with a KV cache."""
    sync(device)
    t0 = time.perf_counter()
    logits, past = model(ids, last_only=True)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    t1 = time.perf_counter()
    for _ in range(new - 1):
        logits, past = model(nxt, past_key_values=past)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    return t1 - t0, (time.perf_counter() - t1) / (new - 1)


def phase_inference(sizes: Sizes, work: Path, out: Path, args) -> dict[str, Any]:
    from lmforge_server.inference.engine import Engine
    from lmforge_server.inference.resolver import DirectoryResolver
    from lmforge_server.inference.sampling import SamplingParams

    t = time.perf_counter()
    path, prompts, (model, tok, facts) = _build_inference_model(sizes, work)
    export_s = time.perf_counter() - t
    texts = [tok.decode(p) for p in prompts]
    new, dev = sizes.new_tokens, sizes.device
    settings = Settings(inference_device=dev, max_batch_size=max(sizes.streams))

    async def engine_figures():
        engine = Engine(settings, DirectoryResolver(path.parent))
        params = SamplingParams(max_new_tokens=new, temperature=0)

        async def run(c: int):
            t = time.perf_counter()
            done = await asyncio.gather(
                *[engine.complete("default", "bench", p, params) for p in texts[:c]]
            )
            return done, time.perf_counter() - t

        await run(1)  # load and warm up
        single = [(await run(1))[0][0] for _ in range(sizes.repeats)]
        aggregate, tokens = {}, {}
        for c in sizes.streams:
            best = 0.0
            for _ in range(sizes.repeats):
                done, wall = await run(c)
                n = sum(d.completion_tokens for d in done)
                best = max(best, n / wall)
                tokens[c] = n
            aggregate[c] = best
        info = await engine.model_info("default", "bench")
        await engine.close()
        return single, aggregate, tokens, info

    single, aggregate, tokens, info = asyncio.run(engine_figures())
    lm = {
        "served_by": f"lmforge engine, {info.execution_provider} ({info.dtype}, KV cache bound in place)",
        "ttft_ms": min(d.timings.time_to_first_token_ms for d in single),
        # The engine's own decode timing: tokens after the first over the time they took.
        "decode_ms_per_token": min(
            1e3 / d.timings.tokens_per_second if d.timings.tokens_per_second else float("inf")
            for d in single
        ),
        "completion_tokens_batch1": single[0].completion_tokens,
        "tokens_per_second": aggregate,
        "tokens_generated": tokens,
    }

    # PyTorch eager, the same weights, in the dtype the engine serves.
    dtype = torch.float16 if info.dtype == "fp16" else torch.float32
    model = model.to(dev, dtype).eval()
    batches = {c: torch.tensor(prompts[:c], device=dev) for c in sizes.streams}
    _torch_decode(model, batches[1], new, dev)
    runs = [_torch_decode(model, batches[1], new, dev) for _ in range(sizes.repeats)]
    eager = {
        "served_by": f"PyTorch eager + KV cache ({str(dtype).removeprefix('torch.')}, {dev})",
        "ttft_ms": min(r[0] for r in runs) * 1e3,
        "decode_ms_per_token": min(r[1] for r in runs) * 1e3,
        "tokens_per_second": {},
    }
    for c in sizes.streams:
        figs = [_torch_decode(model, batches[c], new, dev) for _ in range(sizes.repeats)]
        eager["tokens_per_second"][c] = max(c * new / (f + g * (new - 1)) for f, g in figs)
    return {
        "model": f"{model.num_parameters() / 1e6:.1f}M parameters, "
        f"{model.config.n_layers}x{model.config.d_model}, vocab {model.config.vocab_size}, random weights",
        "prompt_tokens": sizes.prompt_tokens,
        "new_tokens": new,
        "export_seconds": round(export_s, 1),
        "onnx_parity": {
            name: item.get("parity", {}).get("max_abs_logit_diff")
            for name, item in facts["files"].items()
        },
        "lmforge": lm,
        "torch_eager": eager,
    }


# --- the report --------------------------------------------------------------------------------

PHASE_FNS: dict[str, Callable[..., dict[str, Any]]] = {
    "tests": phase_tests,
    "throughput": phase_throughput,
    "recipe": phase_recipe,
    "inference": phase_inference,
}


def _f(x, fmt: str = "{:,.0f}", missing: str = "n/a") -> str:
    return missing if x is None else fmt.format(x)


def render(report: dict[str, Any]) -> str:
    env, phases = report["environment"], report["phases"]
    title = env.get("gpu") or f"CPU ({env['cpu_count']} cores), dry run"
    lines = [f"# lmforge on {title}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "Command: `" + report["command"] + "`", ""]

    if "tests" in phases:
        p = phases["tests"]
        lines += ["## 1. CUDA tests", ""]
        if "error" in p:
            lines += [f"error: {p['error']}", ""]
        else:
            lines += [f"`{p['command']}`: {p['summary']}", "", "| test | outcome | s | detail |"]
            lines += ["|---|---|---|---|"]
            lines += [
                f"| {c['test']} | {c['outcome']} | {c['seconds']} | {c['detail']} |"
                for c in p["cases"]
            ]
            lines.append("")

    if "throughput" in phases:
        p = phases["throughput"]
        lines += ["## 2. Training throughput (GPT-2-small shape, lmforge's training loop)", ""]
        if "error" in p:
            lines += [f"error: {p['error']}", ""]
        else:
            lines += [
                f"Peak used: {_f(p['peak_flops'], '{:.4g}')} FLOP/s ({p['peak_source']}); "
                f"measured {p['measured_matmul']}: {p['measured_matmul_flops']:.4g} FLOP/s.",
                "",
                "| run | batch | tokens/s | MFU (peak) | of measured matmul | nanoGPT (H200) | target |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in p["runs"]:
                ref = NANOGPT_TOKENS_PER_S["compile" if "compile" in r["run"] else "eager"]
                lines.append(
                    f"| {r['run']} | {r['batch']} | {r['tokens_per_second']:,.0f} | "
                    f"{_f(r['mfu'], '{:.1%}')} | {r['fraction_of_measured_matmul']:.1%} | "
                    f"{ref:,} tokens/s, {NANOGPT_MFU:.0%} MFU (compiled) | "
                    f">= {TARGETS['mfu']:.0%} MFU |"
                )
            lines += [""] + [f"- {r['run']}: {r['loop']}" for r in p["runs"]] + [""]

    if "recipe" in phases:
        p = phases["recipe"]
        lines += ["## 3. Tiny Shakespeare, char-level, through the service", ""]
        if "error" in p:
            lines += [f"error: {p['error']}", ""]
        else:
            lines += [
                f"Job {p['state']} on {p['device']}; {p['loop']}",
                "",
                "| | lmforge | nanoGPT | target |",
                "|---|---|---|---|",
                f"| best val loss | {p['best_val_loss']:.4f} (step {p['best_step']}) | "
                f"{NANOGPT_RECIPE['best_val_loss']} | <= {TARGETS['best_val_loss']} |",
                f"| wall time, job created to SUCCEEDED (export included) | "
                f"{p['wall_seconds']:.1f} s | {NANOGPT_RECIPE['wall_seconds']:.0f} s | "
                f"< {TARGETS['wall_seconds']:.0f} s |",
                f"| training time | {p['training_seconds']:.1f} s | | |",
                f"| first eval at or below {TARGETS['best_val_loss']} (step, s) | "
                f"{p['first_eval_at_or_below_target']} | | |",
                "",
            ]
            if p.get("sample"):
                lines += [f"Served by {p['served_by']}:", "", "```", p["sample"], "```", ""]
            if p["job_error"]:
                lines += [f"job error: {p['job_error']}", ""]

    if "inference" in phases:
        p = phases["inference"]
        lines += ["## 4. Inference", ""]
        if "error" in p:
            lines += [f"error: {p['error']}", ""]
        else:
            streams = list(p["lmforge"]["tokens_per_second"])
            lines += [
                f"{p['model']}; {p['prompt_tokens']}-token prompts, {p['new_tokens']} greedy "
                f"tokens; export {p['export_seconds']} s, parity {p['onnx_parity']}.",
                "",
                "| | TTFT ms | decode ms/token | "
                + " | ".join(f"tokens/s at {c}" for c in streams)
                + " |",
                "|---|---|---|" + "---|" * len(streams),
            ]
            for row in (p["lmforge"], p["torch_eager"]):
                figs = " | ".join(f"{row['tokens_per_second'][c]:,.0f}" for c in streams)
                lines.append(
                    f"| {row['served_by']} | {row['ttft_ms']:.2f} | "
                    f"{row['decode_ms_per_token']:.3f} | {figs} |"
                )
            lines += [
                "",
                f"Target: <= {TARGETS['decode_ms_per_token']} ms/token at batch 1 (124M). "
                f"lmforge's batch-1 run generated {p['lmforge']['completion_tokens_batch1']} tokens "
                "(random weights may hit end-of-text early).",
                "",
            ]
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(render(report))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, help="report folder (default bench/out/gpu[-dry-run])")
    ap.add_argument("--only", default=",".join(PHASES), help=f"phases, of {','.join(PHASES)}")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, TFLOP/s")
    ap.add_argument("--tests-timeout", type=int, default=540, help="seconds for the tests")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(only) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}; choose from {','.join(PHASES)}")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: run with --dry-run to check the script on the CPU")
    sizes = DRY if args.dry_run else GPU
    if sizes.torch_threads:
        torch.set_num_threads(sizes.torch_threads)
    out = args.out or ROOT / "bench" / "out" / ("gpu-dry-run" if args.dry_run else "gpu")
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "report.json"
    report = json.loads(previous.read_text()) if previous.exists() else {"phases": {}}
    report["environment"] = environment(sizes.device)
    report["command"] = "python bench/gpu.py " + " ".join(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="lmforge-gpu-"))
    failed = False
    try:
        for phase in only:
            print(f"[{time.strftime('%H:%M:%S')}] {phase} ...", flush=True)
            t = time.perf_counter()
            try:
                result = PHASE_FNS[phase](sizes, work, out, args)
            except Exception as e:
                failed = True
                traceback.print_exc()
                result = {"error": f"{type(e).__name__}: {e}"[:2000]}
            result["phase_seconds"] = round(time.perf_counter() - t, 1)
            report["phases"][phase] = result
            write_report(out, report)
            print(f"[{time.strftime('%H:%M:%S')}] {phase} done in {result['phase_seconds']} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(render(report))
    print(f"\nreport: {out / 'report.md'} and {out / 'report.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
