"""LoRA against full fine-tuning on the `baby` shape: time per step and peak memory.

Each mode runs in a fresh subprocess (so peak RSS is its own): the `baby` model (6 layers,
width 384, context 256; about 10.8M parameters) with random weights standing in for a
registered model, the worker's AdamW (fused, state only for what trains), `--warmup`
untimed steps, then `--steps` timed ones on random tokens. LoRA adapts q_proj and v_proj at
rank 8 (the service's defaults but for the rank). Both modes print in one run, side by side.

    python bench/bench_lora.py                  # batch 16 (the preset's 64 with --batch 64)
    python bench/bench_lora.py --batch 8 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one_mode(mode: str, batch: int, warmup: int, steps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lmforge_server.specs import resolve
    from lmforge_worker.model import Llama, add_lora
    from lmforge_worker.training import _configure_optimizer

    if threads:
        torch.set_num_threads(threads)
    lora = mode == "lora"
    training = {"init_from": "bench", "lora_rank": 8} if lora else {}
    spec = resolve("baby", {}, {"batch_size": batch, **training}, num_distinct_chars=64)
    m, t = spec.model, spec.training
    torch.manual_seed(0)
    model = Llama(m)
    if lora:
        add_lora(model, t.lora_rank, t.lora_alpha, t.lora_dropout, t.lora_target_list)
    model.train()
    optimizer = _configure_optimizer(model, t, torch.device("cpu"))
    x = torch.randint(0, m.vocab_size, (batch, m.context_length))
    y = torch.randint(0, m.vocab_size, (batch, m.context_length))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        logits, _ = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    state = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    return {
        "mode": mode,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "s_per_step": sorted(times)[len(times) // 2],
        "optimizer_state_mb": state / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=2, help="runs per mode, alternated; best kept")
    p.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        out = one_mode(args.child, args.batch, args.warmup, args.steps, args.threads)
        print(json.dumps(out))
        return
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    # Alternated, so a change in machine load hits both modes alike.
    for _ in range(args.repeat):
        for mode in ("full", "lora"):
            cmd = [sys.executable, __file__, "--child", mode, "--batch", str(args.batch)]
            cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
            cmd += ["--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    rows = [min(runs[mode], key=lambda r: r["s_per_step"]) for mode in ("full", "lora")]
    load = os.getloadavg()
    print(
        f"baby shape, batch {args.batch} x 256, {args.steps} timed steps (median; best of "
        f"{args.repeat} alternated runs per mode), "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"{'mode':6} {'trainable':>12} {'s/step':>8} {'optimizer MB':>13} {'peak RSS MB':>12}")
    for r in rows:
        print(
            f"{r['mode']:6} {r['trainable']:>12,} {r['s_per_step']:>8.3f} "
            f"{r['optimizer_state_mb']:>13.1f} {r['peak_rss_mb']:>12.0f}"
        )
    full, lora = rows
    print(
        f"LoRA/full: time per step {lora['s_per_step'] / full['s_per_step']:.2f}x, "
        f"peak RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
