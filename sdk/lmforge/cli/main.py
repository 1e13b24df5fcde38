"""The `lmforge` entry point: parse, run, and turn errors into one line and an exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from lmforge import errors
from lmforge._connection import ConnectionConfig
from lmforge.cli.context import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    MissingExtras,
    UsageError,
)
from lmforge.cli.parser import _NEEDS_ID, build_parser


def _server_of(args: argparse.Namespace) -> str:
    """Which server a command talks to, with its address, for error messages."""
    if args.command == "health" and args.addr:
        return args.addr
    config = ConnectionConfig.resolve(api_addr=args.api, inference_addr=args.inference)
    if getattr(args, "server", "api") == "inference":
        return f"the inference server at {config.inference_addr}"
    return f"the API server at {config.api_addr}"


def _fail(message: str) -> None:
    print(f"lmforge: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The `lmforge` entry point; always exits via SystemExit with the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in (
        "api",
        "inference",
        "api_key",
        "tls_ca_file",
        "tls_client_cert",
        "tls_client_key",
        "timeout",
    ):
        setattr(args, name, getattr(args, name, None))
    args.json = getattr(args, "json", False)
    if (args.command, getattr(args, "action", None)) in _NEEDS_ID and not args.id:
        parser.error(f"{args.command} {args.action} needs an id")
    try:
        code = args.func(args)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        _fail(str(e))
        code = EXIT_USAGE
    except MissingExtras as e:
        _fail(str(e))
        code = EXIT_ERROR
    except errors.UnavailableError as e:
        _fail(f"cannot reach {_server_of(args)} ({e.message}); is `lmforge up` running?")
        code = EXIT_ERROR
    except errors.LmforgeError as e:
        _fail(str(e))
        code = EXIT_ERROR
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        _fail(f"{e.filename}: {e.strerror}")
        code = EXIT_ERROR
    except KeyboardInterrupt:
        _fail("interrupted")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:  # `lmforge ... | head`
        sys.stderr.close()
        code = EXIT_OK
    sys.exit(code)
