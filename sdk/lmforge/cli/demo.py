"""`lmforge demo`: train a small model on Tiny Shakespeare and stream a sample."""

from __future__ import annotations

import argparse
import sys

from lmforge import errors
from lmforge._progress import format_duration
from lmforge.cli.context import EXIT_ERROR, EXIT_OK, MissingExtras, _server_settings
from lmforge.cli.generate import _stats
from lmforge.cli.output import describe_parameters, human_bytes
from lmforge.client import Client
from lmforge.types import (
    Completion,
    FinishReason,
    Job,
    Timings,
    Usage,
)

DEMO_PROMPT = "ROMEO:\n"


DEMO_TOKENS = 300


def stream_passage(client: Client, job: Job, prompt: str, tokens: int, *, seed: int) -> Completion:
    """Streams `tokens` tokens to stdout, longer than the model's context if need be: each
    call continues from the last half-context of text (the server generates at most up to
    the context length per call)."""
    half = max(1, job.spec.model.context_length // 2)
    text, done, calls, last = prompt, 0, 0, None
    while done < tokens:
        # Characters >= tokens for every tokenizer, so this tail fits in half the context.
        with client.stream(
            job.model_id, text[-half:], max_tokens=tokens - done, temperature=0.8,
            seed=seed + calls, truncate_prompt=True,
        ) as stream:  # fmt: skip
            for delta in stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        last, calls = stream.final, calls + 1
        text += stream.text
        produced = last.usage.completion_tokens if last and last.usage else 0
        done += produced
        if not produced or (last and last.finish_reason in (FinishReason.EOS, FinishReason.STOP)):
            break
    usage = Usage(prompt_tokens=len(prompt), completion_tokens=done)
    timings = last.timings if last and last.timings else Timings()
    finish = last.finish_reason if last and last.finish_reason else FinishReason.LENGTH
    return Completion(
        last.model_id if last else job.model_id, text[len(prompt) :], [], [], finish, usage, timings
    )


def cmd_demo(args: argparse.Namespace) -> int:
    # Free ports of its own, so the demo runs beside an `lmforge up` already listening.
    settings = _server_settings(
        args,
        api_addr=args.api_addr or "127.0.0.1:0",
        inference_addr=args.inference_addr or "127.0.0.1:0",
    )
    try:
        from lmforge_server.stack import BUNDLED_CORPUS, Stack
    except ImportError as e:
        raise MissingExtras("demo", e) from e
    print(
        f"Starting Redis, the API server, the inference server and a worker in {settings.data_dir} ..."
    )
    with Stack(settings) as stack:
        with Client(
            api_addr=stack.api_addr, inference_addr=stack.inference_addr, api_key=args.api_key
        ) as client:
            dataset = client.datasets.upload(BUNDLED_CORPUS, name="tinyshakespeare")
            print(
                f"Uploaded {dataset.name}: {human_bytes(dataset.size_bytes)}, {dataset.num_chars:,} characters, "
                f"{dataset.num_distinct_chars} distinct."
            )
            job = client.jobs.create(dataset=dataset, preset=args.preset, model_name="shakespeare")
            m = job.spec.model
            print(
                f"Training job {job.id} (preset {job.spec.preset!r}): {m.n_layers} layers, {m.n_heads} heads, "
                f"width {m.d_model}, context {m.context_length}, {m.tokenizer} tokenizer."
            )
            print(f"The model has {describe_parameters(job)}.")
            try:
                job = client.jobs.wait(job.id, progress=True)
            except errors.JobFailedError as e:
                print(f"Training failed: {e}", file=sys.stderr)
                return EXIT_ERROR
            p = job.progress
            val = f"; validation loss {p.best_val_loss:.3f}" if p.best_val_loss else ""
            print(
                f"Trained {p.step} steps in {format_duration(p.elapsed_seconds)}{val}. Model {job.model_id}."
            )
            print(f"\nSampling {DEMO_TOKENS} tokens at temperature 0.8 from {DEMO_PROMPT!r}:\n")
            sys.stdout.write(DEMO_PROMPT)
            passage = stream_passage(client, job, DEMO_PROMPT, DEMO_TOKENS, seed=args.seed)
            print("\n")
            print(_stats(passage))
    print(
        f"\nThe model stays in {settings.data_dir}: run `lmforge up`, then `lmforge generate shakespeare 'JULIET:'`."
    )
    return EXIT_OK
