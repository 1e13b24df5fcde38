"""Trains the classic char-level Tiny Shakespeare recipe through the running service.

nanoGPT's CPU recipe: 4 layers, 4 heads, width 128, context 64, batch 12, 2000 steps,
lr 1e-3 decayed to 1e-4, dropout 0. Its published validation loss is about 1.88.

    python bench/bench_training.py                 # starts an embedded stack in a temp dir
    python bench/bench_training.py --api HOST:PORT # against a running `lmforge up`
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import grpc

from lmforge.v1 import common_pb2, training_pb2, training_pb2_grpc
from lmforge_server.settings import Settings
from lmforge_server.stack import BUNDLED_CORPUS, Stack

PUBLISHED_VAL_LOSS = 1.88

RECIPE = training_pb2.JobSpec(
    preset="small",
    model=common_pb2.ModelSpec(
        n_layers=4, n_heads=4, d_model=128, context_length=64, tokenizer="char", dropout=0.0
    ),
    training=common_pb2.TrainingSpec(
        max_steps=2000,
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
    ),
)


def run(api_addr: str, steps: int) -> None:
    data = BUNDLED_CORPUS.read_bytes()
    with grpc.insecure_channel(api_addr) as channel:
        datasets = training_pb2_grpc.DatasetServiceStub(channel)
        jobs = training_pb2_grpc.JobServiceStub(channel)
        header = training_pb2.UploadDatasetHeader(
            name="tinyshakespeare", sha256=hashlib.sha256(data).hexdigest()
        )
        chunks = [training_pb2.UploadDatasetRequest(header=header)] + [
            training_pb2.UploadDatasetRequest(chunk=data[i : i + (1 << 20)])
            for i in range(0, len(data), 1 << 20)
        ]
        ds = datasets.UploadDataset(iter(chunks))
        spec = training_pb2.JobSpec()
        spec.CopyFrom(RECIPE)
        spec.training.max_steps = steps
        t0 = time.monotonic()
        job = jobs.CreateJob(training_pb2.CreateJobRequest(dataset_id=ds.id, spec=spec))
        print(f"job {job.id}: {job.parameters.total:,} parameters, {steps} steps")
        events = []
        for ev in jobs.WatchJob(training_pb2.WatchJobRequest(id=job.id)):
            events.append(ev)
            if ev.type == training_pb2.JOB_EVENT_TYPE_EVAL or ev.message.startswith("training "):
                print(f"  {ev.message}", flush=True)
            if ev.terminal:
                break
        wall = time.monotonic() - t0
        job = jobs.GetJob(training_pb2.GetJobRequest(id=job.id))
    state = training_pb2.JobState.Name(job.state)
    p = job.progress
    print(f"state                {state} {job.error}")
    print(
        f"best val loss        {p.best_val_loss:.4f}  (published for this recipe: ~{PUBLISHED_VAL_LOSS})"
    )
    print(f"val bits per byte    {p.val_bits_per_byte:.4f}")
    print(f"tokens/s (training)  {p.tokens_per_second:,.0f}")
    print(f"wall time            {wall:.1f} s (job creation to SUCCEEDED, export included)")
    print(f"load average         {' '.join(f'{x:.2f}' for x in os.getloadavg())} (at the end)")
    created = job.created_at.ToNanoseconds() / 1e9
    reached = next(
        (
            e
            for e in events
            if e.type == training_pb2.JOB_EVENT_TYPE_EVAL
            and e.progress.val_loss <= PUBLISHED_VAL_LOSS
        ),
        None,
    )
    if reached is not None:
        at = reached.time.ToNanoseconds() / 1e9 - created
        print(
            f"val loss <= {PUBLISHED_VAL_LOSS}      {at:.1f} s after creation (step {reached.progress.step})"
        )
    print_phases(events, created, wall)


def print_phases(events, created: float, wall: float) -> None:
    """Where the time went, from the job's events and the worker's `timings:` note."""
    t = {}
    for e in events:
        if e.type == training_pb2.JOB_EVENT_TYPE_LOG and e.message.startswith("timings: "):
            t = {k: float(v) for k, v in (kv.split("=") for kv in e.message[9:].split())}
            noted = e.time.ToNanoseconds() / 1e9
    running = next(e for e in events if e.state == training_pb2.JOB_STATE_RUNNING)
    if not t:
        return
    phases = {
        "queue + worker start": running.time.ToNanoseconds() / 1e9 - created,
        "imports (torch, onnx)": t.get("imports", 0.0),
        "tokenisation": t.get("data", 0.0),
        "training steps": t.get("steps", 0.0),
        "evaluation": t.get("eval", 0.0),
        "checkpoints": t.get("checkpoints", 0.0),
        "export + parity": t.get("export", 0.0),
        "registration": events[-1].time.ToNanoseconds() / 1e9 - noted,
    }
    phases["other (model build, events)"] = wall - sum(phases.values())
    print("where the time went")
    for name, seconds in phases.items():
        print(f"  {name:28s} {seconds:6.1f} s  {100 * seconds / wall:4.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", help="address of a running API server")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="the worker's torch threads (0: its default)"
    )
    parser.add_argument(
        "--train-spin",
        action=argparse.BooleanOptionalAction,
        default=Settings().train_spin,
        help="Settings.train_spin: OpenMP threads spin between kernels (default: on)",
    )
    args = parser.parse_args()
    print(f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.api:
        print(f"worker OpenMP threads {'spin (bounded)' if args.train_spin else 'wait passively'}")
    if args.api:
        run(args.api, args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            api_addr="127.0.0.1:0",
            inference_addr="127.0.0.1:0",
            torch_threads=args.torch_threads,
            train_spin=args.train_spin,
        )
        with Stack(settings, inference=False) as stack:
            run(stack.api_addr, args.steps)


if __name__ == "__main__":
    main()
