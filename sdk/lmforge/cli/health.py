"""`lmforge health`: ask a server's gRPC health service."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from lmforge import errors
from lmforge.cli.context import EXIT_ERROR, EXIT_OK, _client
from lmforge.cli.output import print_json

_HEALTH = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def check_health(
    addr: str, service: str = "", *, timeout: float = 5.0, tls_ca_file: str | None = None
) -> str:
    """The gRPC health service's answer at addr ("SERVING", ...), without grpcio-health-checking:
    HealthCheckRequest is one string field and HealthCheckResponse one enum field, so the
    bytes are written and read by hand."""
    name = service.encode()
    request = (b"\x0a" + _varint(len(name)) + name) if name else b""
    creds = grpc.ssl_channel_credentials(Path(tls_ca_file).read_bytes()) if tls_ca_file else None
    channel = grpc.secure_channel(addr, creds) if creds else grpc.insecure_channel(addr)
    with channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            response = check(request, timeout=timeout)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from e
    status = response[1] if len(response) >= 2 and response[0] == 0x08 else 0
    return _HEALTH.get(status, "UNKNOWN")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def cmd_health(args: argparse.Namespace) -> int:
    addr = args.addr or _client(args).api_addr
    status = check_health(
        addr, args.service, timeout=args.timeout or 5.0, tls_ca_file=args.tls_ca_file
    )
    if args.json:
        print_json({"addr": addr, "status": status})
    else:
        print(f"{addr}  {status}")
    return EXIT_OK if status == "SERVING" else EXIT_ERROR
