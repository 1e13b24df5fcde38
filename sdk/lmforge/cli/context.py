"""What every command shares: exit codes, usage errors, the client and server settings built from flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from lmforge import overrides
from lmforge.client import Client

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


EXTRAS_HINT = "pip install 'lmforge[all]'"


class UsageError(Exception):
    """Bad arguments that argparse cannot see (exit code 2)."""


def parse_overrides(pairs: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--set` pairs as (model fields, training fields); see `lmforge.overrides`."""
    try:
        return overrides.parse_overrides(pairs)
    except overrides.OverrideError as e:
        raise UsageError(f"--set {e}") from None


def _client(args: argparse.Namespace) -> Client:
    return Client(
        api_addr=args.api,
        inference_addr=args.inference,
        api_key=args.api_key,
        timeout=args.timeout,
        tls_ca_file=args.tls_ca_file,
        tls_client_cert_file=args.tls_client_cert,
        tls_client_key_file=args.tls_client_key,
    )


def _bar_wanted(args: argparse.Namespace) -> bool:
    return not args.json and sys.stderr.isatty()


class MissingExtras(Exception):
    def __init__(self, command: str, error: ImportError):
        super().__init__(
            f"`lmforge {command}` needs the server extras ({error.name or error} is missing): "
            f"{EXTRAS_HINT}"
        )


def _server_settings(args: argparse.Namespace, **forced: Any) -> Any:
    try:
        from lmforge_server.settings import Settings
    except ImportError as e:
        raise MissingExtras(args.command, e) from e
    flags = {
        name: getattr(args, name, None)
        for name in (
            "data_dir", "redis_url", "artifacts", "api_addr", "inference_addr", "http_addr", "device",
            "api_keys_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file",
        )
    }  # fmt: skip
    # The gateway reaches the servers as a client: the same CA and client certificate flags.
    flags |= {
        "tls_ca_file": getattr(args, "tls_ca_file", None),
        "tls_client_cert_file": getattr(args, "tls_client_cert", None),
        "tls_client_key_file": getattr(args, "tls_client_key", None),
    }
    if getattr(args, "allow_unauthenticated", False):
        flags["allow_unauthenticated"] = True
    return Settings.from_env(**{**flags, **forced})
