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
            else:
                print(completion.text)
                if sys.stderr.isatty():
                    print(_stats(completion), file=sys.stderr)
            return EXIT_OK
        with client.stream(args.model, prompt, **_sampling(args)) as stream:
            for delta in stream:
                if args.json:
                    print_json(delta)
                else:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
        if not args.json:
            print()
            if stream.final and sys.stderr.isatty():
                print(_stats(stream.final), file=sys.stderr)
    return EXIT_OK
