"""`lmforge generate`: stream (or wait for) a completion."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lmforge._progress import format_rate
from lmforge.cli.context import EXIT_OK, _client
from lmforge.cli.output import print_json
from lmforge.types import (
    Completion,
)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or None,
        truncate_prompt=args.truncate_prompt,
        n=args.n,
        request_id=args.request_id,
        context_shift=args.context_shift,
        variant=args.variant,
    )


def _stats(c: Completion | Any) -> str:
    t, u = c.timings, c.usage
    return (
        f"[{c.finish_reason.value} · {u.completion_tokens} tokens · "
        f"{format_rate(t.tokens_per_second)} · first token {t.time_to_first_token_ms:.0f} ms]"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    with _client(args) as client:
        if args.no_stream:
            completion = client.generate(args.model, prompt, **_sampling(args))
            if args.json:
                print_json(completion)
            elif completion.choices:
                for choice in completion.choices:
                    print(f"--- sample {choice.index} ({choice.finish_reason.value}) ---")
                    print(choice.text)
            else:
                print(completion.text)
                if sys.stderr.isatty():
                    print(_stats(completion), file=sys.stderr)
            return EXIT_OK
        samples: dict[int, str] = {}
        # --timeout bounds the whole stream and its restarts, as it bounds a unary call (the
        # SDK's streams have no deadline unless given one).
        with client.stream(args.model, prompt, timeout=args.timeout, **_sampling(args)) as stream:
            for delta in stream:
                if args.json:
                    print_json(delta)
                elif (args.n or 1) > 1:  # interleaved samples: each printed when it ends
                    samples[delta.index] = samples.get(delta.index, "") + delta.text
                    if delta.final:
                        reason = delta.finish_reason.value if delta.finish_reason else ""
                        print(f"--- sample {delta.index} ({reason}) ---")
                        print(samples[delta.index])
                else:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
        if not args.json and (args.n or 1) <= 1:
            print()
            if stream.final and sys.stderr.isatty():
                print(_stats(stream.final), file=sys.stderr)
    return EXIT_OK


def cmd_abort(args: argparse.Namespace) -> int:
    with _client(args) as client:
        aborted = client.abort(args.request_id)
    if args.json:
        print_json({"request_id": args.request_id, "aborted": aborted})
    else:
        print("aborted" if aborted else f"no generation of yours is running as {args.request_id!r}")
    return EXIT_OK
