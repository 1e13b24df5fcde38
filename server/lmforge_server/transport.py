"""How a server listens: TLS or mTLS from settings, and secure by default.

A server refuses to start on a non-loopback address without API keys unless the operator
set `allow_unauthenticated`; keys cross the network only inside TLS when TLS is configured.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import grpc

from lmforge_server.auth import KeyConfigError, Keyring
from lmforge_server.settings import Settings

log = logging.getLogger("lmforge.transport")


def is_loopback(addr: str) -> bool:
    """Whether a listen address ("host:port", "[::1]:port", "unix:...") stays on this host."""
    if addr.startswith("unix:"):
        return True
    host = addr.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "0.0.0.0" is an address; "" and host names may reach the network


def keyring_or_exit(settings: Settings, addr: str) -> Keyring:
    """The server's keys; SystemExit for a malformed key file or an open public bind."""
    try:
        keyring = Keyring.from_settings(settings)
    except (KeyConfigError, OSError) as e:
        raise SystemExit(f"API keys: {e}") from None
    if not keyring and not is_loopback(addr) and not settings.allow_unauthenticated:
        raise SystemExit(
            f"refusing to serve {addr} without API keys: set LMFORGE_API_KEYS or "
            "LMFORGE_API_KEYS_FILE, listen on 127.0.0.1, or pass --allow-unauthenticated"
        )
    return keyring


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (mTLS with a client CA) from settings, or None for plaintext."""
    if not (settings.tls_cert_file or settings.tls_key_file):
        if settings.tls_client_ca_file:
            raise SystemExit("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise SystemExit("TLS needs both tls_cert_file and tls_key_file")
    try:
        chain = Path(settings.tls_cert_file).read_bytes()
        key = Path(settings.tls_key_file).read_bytes()
        client_ca = (
            Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
        )
    except OSError as e:
        raise SystemExit(f"TLS: {e}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def listen(server: grpc.aio.Server, settings: Settings, addr: str) -> int:
    """Binds `addr` with TLS when configured; returns the port (SystemExit when it cannot)."""
    creds = server_credentials(settings)
    if creds is None:
        if not is_loopback(addr):
            log.warning("serving %s in plaintext: API keys cross the network in the clear", addr)
        port = server.add_insecure_port(addr)
    else:
        port = server.add_secure_port(addr, creds)
    if port == 0:
        raise SystemExit(f"cannot listen on {addr}")
    return port
