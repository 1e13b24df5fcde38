"""Where a CPU training step goes: lmforge's training loop against a minimal nanoGPT loop.

Every variant runs in a fresh process of its own (OpenMP reads its wait policy when torch
loads), and the variants take turns, round after round, so that a change of load on a
shared machine hits them all alike. Each reports wall and CPU milliseconds per step over
its steady state (the first `--warmup` steps left out):

- `service`: `lmforge_worker.training.train` on bench_training.py's recipe, with hooks
  that do what the worker's do per step (a stop check every step, a progress dict every
  `log_interval` steps), evaluation and checkpoints left to the recipe;
- `llama`: our model in a bare loop (batch, forward, backward, clip, fused AdamW), with
  the time of each phase;
- `nanogpt`: nanoGPT's model (LayerNorm, GELU, fused QKV, learned positions) in the same
  bare loop with its own optimizer settings (foreach AdamW on CPU).

    python bench/bench_training_step.py                         # 1 and 2 threads, 3 rounds
    python bench/bench_training_step.py --variants service:1,service:2:ACTIVE
    python bench/bench_training_step.py --profile service:1     # torch.profiler's top ops
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE_MODEL = dict(
    n_layers=4, n_heads=4, d_model=128, context_length=64, tokenizer="char", dropout=0.0
)
RECIPE_TRAINING = dict(
    batch_size=12,
    learning_rate=1e-3,
    min_learning_rate=1e-4,
    warmup_steps=100,
    weight_decay=0.1,
    beta2=0.99,
    eval_interval=250,
    eval_batches=20,
    val_fraction=0.1,
    checkpoint_interval=1000,
    log_interval=50,
)


def recipe(steps: int):
    from lmforge_server.specs import resolve
    from lmforge_server.stack import BUNDLED_CORPUS

    chars = len(set(BUNDLED_CORPUS.read_text()))
    return resolve(
        "small", RECIPE_MODEL, {**RECIPE_TRAINING, "max_steps": steps}, num_distinct_chars=chars
    )


class _Clock:
    """Wall and CPU time at each mark, for rates over a steady window."""

    def __init__(self):
        self.marks: list[tuple[int, float, float]] = []

    def mark(self, step: int) -> None:
        self.marks.append((step, time.perf_counter(), time.process_time()))

    def rates(self, warmup: int) -> dict[str, float]:
        marks = [m for m in self.marks if m[0] >= warmup]
        (s0, w0, c0), (s1, w1, c1) = marks[0], marks[-1]
        n = max(1, s1 - s0)
        return {"wall_ms": 1000 * (w1 - w0) / n, "cpu_ms": 1000 * (c1 - c0) / n, "steps": n}


def run_service(steps: int, warmup: int, profile: bool) -> dict:
    from lmforge_server.stack import BUNDLED_CORPUS
    from lmforge_worker import training

    clock = _Clock()

    class Hooks:  # the worker's per-step work without Redis: a stop check, a progress dict
        def should_stop(self):
            return None

        def on_progress(self, p):
            clock.mark(p.step)

        def on_eval(self, *args):
            pass

        def on_checkpoint(self, step, path):
            pass

    spec = recipe(steps)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # The data once before timing (the service tokenises before the loop too).
        training.prepare_data(
            BUNDLED_CORPUS,
            work / "w" / "data",
            tokenizer="char",
            vocab_size=spec.model.vocab_size,
            val_fraction=spec.training.val_fraction,
        )
        ctx = _profiler() if profile else _null()
        with ctx as prof:
            result = training.train(spec, BUNDLED_CORPUS, work / "w", work / "c", Hooks())
        out = clock.rates(warmup)
        out["timings"] = result.timings
        out["val_loss"] = result.best_val_loss
        if profile:
            out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        return out


def _null():
    import contextlib

    return contextlib.nullcontext()


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


def run_bare(kind: str, steps: int, warmup: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lmforge_server.stack import BUNDLED_CORPUS
    from lmforge_worker.model import Llama

    spec = recipe(steps)
    m, t = spec.model, spec.training
    text = BUNDLED_CORPUS.read_text()
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    data = np.array([stoi[c] for c in text], dtype=np.uint16)
    B, T = t.batch_size, m.context_length
    torch.manual_seed(1337)
    if kind == "nanogpt":
        model = NanoGPT(m.vocab_size, T, m.n_layers, m.n_heads, m.d_model)
        fused = False  # nanoGPT: fused only on CUDA
    else:
        model = Llama(m)
        fused = True
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), fused=fused)
    g = torch.Generator().manual_seed(t.seed)
    phases = dict.fromkeys(("batch", "forward", "backward", "clip", "optimizer"), 0.0)
    clock = _Clock()
    for step in range(steps):
        if step >= warmup and step % 10 == 0:
            clock.mark(step)
        t0 = time.perf_counter()
        ix = torch.randint(len(data) - T, (B,), generator=g).tolist()
        xy = torch.from_numpy(np.stack([data[i : i + T + 1] for i in ix]).astype(np.int64))
        x, y = xy[:, :-1], xy[:, 1:]
        t1 = time.perf_counter()
        logits = model(x)
        logits = logits[0] if isinstance(logits, tuple) else logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if step >= warmup:
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                phases[name] += dt
    clock.mark(steps)
    out = clock.rates(warmup)
    out["phases_ms"] = {k: 1000 * v / max(1, steps - warmup) for k, v in phases.items()}
    return out


def _nanogpt_classes():
    """nanoGPT's model.py (Karpathy), trimmed to training: bias=False, dropout 0."""
    import torch
    import torch.nn as nn
    from torch.nn import functional as F

    class LayerNorm(nn.Module):
        def __init__(self, ndim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(ndim))

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

    class Attention(nn.Module):
        def __init__(self, d, nh):
            super().__init__()
            self.c_attn = nn.Linear(d, 3 * d, bias=False)
            self.c_proj = nn.Linear(d, d, bias=False)
            self.nh, self.d = nh, d

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(self.d, dim=2)
            q, k, v = (a.view(B, T, self.nh, C // self.nh).transpose(1, 2) for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class Block(nn.Module):
        def __init__(self, d, nh):
            super().__init__()
            self.ln_1, self.ln_2 = LayerNorm(d), LayerNorm(d)
            self.attn = Attention(d, nh)
            self.c_fc = nn.Linear(d, 4 * d, bias=False)
            self.c_proj = nn.Linear(4 * d, d, bias=False)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self, vocab, block, n_layer, n_head, d):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
            self.h = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
            self.ln_f = LayerNorm(d)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.wte.weight = self.lm_head.weight
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx):
            pos = torch.arange(idx.size(1), device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            return self.lm_head(self.ln_f(x))

    return GPT


def NanoGPT(*args):
    return _nanogpt_classes()(*args)


def child(args) -> None:
    import torch

    kind, threads = args.child.split(":")[:2]
    torch.set_num_threads(int(threads))
    if kind == "service":
        out = run_service(args.steps, args.warmup, args.profile)
    else:
        out = run_bare(kind, args.steps, args.warmup)
    out["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out))


def spawn(variant: str, args) -> dict:
    kind, threads, *policy = variant.split(":")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for item in policy:  # PASSIVE / ACTIVE (OMP_WAIT_POLICY), or spin=N (GOMP_SPINCOUNT)
        if item.startswith("spin="):
            env["GOMP_SPINCOUNT"] = item[5:]
        else:
            env["OMP_WAIT_POLICY"] = item
    cmd = [sys.executable, __file__, "--child", f"{kind}:{threads}"]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.profile:
        cmd += ["--profile", "1"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{variant} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants",
        default="service:1,service:2,llama:1,nanogpt:1",
        help="comma-separated KIND:THREADS[:PASSIVE|ACTIVE][:spin=N], KIND in service, llama, "
        "nanogpt; PASSIVE/ACTIVE set OMP_WAIT_POLICY, spin=N GOMP_SPINCOUNT",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", help="one variant to run once under torch.profiler")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.profile:
        variant, args.profile = args.profile, True
        out = spawn(variant, args)
        print(out.pop("profile"))
        print(json.dumps(out, indent=1))
        return
    variants = args.variants.split(",")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    print(f"{args.steps} steps, first {args.warmup} left out; load {os.getloadavg()}")
    for r in range(args.rounds):
        for v in variants:
            out = spawn(v, args)
            results[v].append(out)
            extra = ""
            if "phases_ms" in out:
                extra = "  " + " ".join(f"{k} {x:.1f}" for k, x in out["phases_ms"].items())
            print(
                f"round {r} {v:22s} {out['wall_ms']:6.1f} ms/step wall {out['cpu_ms']:6.1f} cpu"
                f"{extra}  load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    print("best of rounds (wall ms/step, cpu ms/step):")
    for v, outs in results.items():
        print(
            f"  {v:22s} {min(o['wall_ms'] for o in outs):6.1f}  "
            f"{min(o['cpu_ms'] for o in outs):6.1f}"
        )


if __name__ == "__main__":
    main()
