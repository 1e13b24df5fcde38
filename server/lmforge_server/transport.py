"""How a server listens: TLS or mTLS from settings, and secure by default.

A server refuses to start on a non-loopback address without API keys unless the operator
set `allow_unauthenticated`; keys cross the network only inside TLS when TLS is configured.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from pathlib import Path
from typing import Any

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


def _tls_files(settings: Settings) -> tuple[bytes, bytes, bytes | None] | None:
    """(certificate chain, key, client CA or None) from settings, or None for plaintext."""
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
    return chain, key, client_ca


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (mTLS with a client CA) from settings, or None for plaintext."""
    files = _tls_files(settings)
    if files is None:
        return None
    chain, key, client_ca = files
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def http_tls(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS arguments for the HTTP gateway, from the same settings as the gRPC
    servers (certificate, key, client CA for mTLS); empty for plaintext."""
    if _tls_files(settings) is None:  # validates the files like the gRPC servers do
        return {}
    out: dict[str, Any] = {
        "ssl_certfile": settings.tls_cert_file,
        "ssl_keyfile": settings.tls_key_file,
    }
    if settings.tls_client_ca_file:
        out |= {"ssl_ca_certs": settings.tls_client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return out


def _client_files(settings: Settings) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(CA, client certificate, client key) the gateway uses to reach the servers."""
    try:
        return tuple(  # type: ignore[return-value]
            Path(f).read_bytes() if f else None
            for f in (
                settings.tls_ca_file,
                settings.tls_client_cert_file,
                settings.tls_client_key_file,
            )
        )
    except OSError as e:
        raise SystemExit(f"TLS: {e}") from None


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """How the gateway reaches the API and inference servers: TLS trusting tls_ca_file
    (with a client certificate for mTLS), or None for plaintext when no CA is set."""
    if not settings.tls_ca_file:
        return None
    ca, cert, key = _client_files(settings)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def probe_ssl_context(settings: Settings) -> ssl.SSLContext:
    """An HTTPS client context trusting tls_ca_file, presenting the client certificate if set."""
    context = ssl.create_default_context(cafile=settings.tls_ca_file or None)
    if settings.tls_client_cert_file:
        context.load_cert_chain(settings.tls_client_cert_file, settings.tls_client_key_file or None)
    return context


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
