"""DDP step time: 2 CPU processes (torchrun, gloo) against 1 process, same global batch.

The nanoGPT CPU recipe's model (4 layers, 4 heads, width 128, context 64, char tokens) at a
global batch of 32, trained for a few dozen steps through the worker's own code paths
(`training.train` and `distributed.launch`). Step times are the loop's own (from its
tokens/s), the first steps (warm-up) left out; the load average is printed beside them.

    python bench/bench_ddp.py [--steps 60] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from lmforge_server.specs import resolve
from lmforge_server.stack import BUNDLED_CORPUS
from lmforge_worker.distributed import launch
from lmforge_worker.training import train

MODEL = dict(n_layers=4, n_heads=4, d_model=128, context_length=64, tokenizer="char")


class StepTimes:
    def __init__(self):
        self.seconds: list[float] = []

    def should_stop(self):
        return None

    def on_progress(self, p) -> None:
        self.seconds.append(self.tokens_per_step / p.tokens_per_second)

    def on_eval(self, *args) -> None:
        pass

    def on_checkpoint(self, step, path) -> None:
        pass


def measure(label: str, run, spec, corpus: Path, tmp: Path, **kw) -> float:
    hooks = StepTimes()
    t = spec.training
    hooks.tokens_per_step = t.batch_size * t.grad_accum_steps * spec.model.context_length
    run(spec, corpus, tmp / label / "work", tmp / label / "ckpt", hooks, **kw)
    steady = hooks.seconds[len(hooks.seconds) // 5 :]
    ms = statistics.median(steady) * 1000
    print(
        f"{label:<28} {ms:7.1f} ms/step (median of {len(steady)}; "
        f"p90 {sorted(steady)[int(len(steady) * 0.9)] * 1000:.1f})   load {os.getloadavg()[0]:.2f}"
    )
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
    args = ap.parse_args()
    text = BUNDLED_CORPUS.read_text()
    training = dict(
        max_steps=args.steps,
        batch_size=args.batch,
        log_interval=1,
        eval_interval=args.steps,
        eval_batches=2,
        checkpoint_interval=args.steps,
        compile="off",
    )

    def spec(devices: int):
        return resolve(
            "small", MODEL, {**training, "devices": devices}, num_distinct_chars=len(set(text))
        )

    print(f"cores {os.cpu_count()}, load before {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        corpus = tmp / "corpus.txt"
        corpus.write_text(text)
        one_2t = measure("1 process, 2 threads", train, spec(1), corpus, tmp, torch_threads=2)
        one_1t = measure("1 process, 1 thread", train, spec(1), corpus, tmp, torch_threads=1)
        ddp = measure("2 processes (DDP), 1 thr", launch, spec(2), corpus, tmp, torch_threads=1)
    print(
        f"DDP 2 procs / 1 proc (2 threads): {ddp / one_2t:.2f}x step time; "
        f"/ 1 proc (1 thread): {ddp / one_1t:.2f}x"
    )


if __name__ == "__main__":
    main()
