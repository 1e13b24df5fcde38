"""`lmforge up`, `lmforge serve api|inference|http`, `lmforge worker`."""

from __future__ import annotations

import argparse

from lmforge.cli.context import EXIT_OK, MissingExtras, _server_settings


def cmd_up(args: argparse.Namespace) -> int:
    settings = _server_settings(args)
    try:
        from lmforge_server.stack import run_up
    except ImportError as e:
        raise MissingExtras("up", e) from e
    run_up(settings, tls=getattr(args, "tls", False))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _server_settings(args)
    try:
        if args.role == "api":
            from lmforge_server.api import run
        elif args.role == "http":
            from lmforge_server.http.app import run
        else:
            from lmforge_server.inference.server import run
    except ImportError as e:
        raise MissingExtras(f"serve {args.role}", e) from e
    run(settings)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _server_settings(args)
    try:
        from lmforge_worker.app import run_worker
    except ImportError as e:
        raise MissingExtras("worker", e) from e
    run_worker(settings)
    return EXIT_OK
