"""Where the servers are and how to talk to them: addresses, API key, TLS, channel options.

`ConnectionConfig.resolve` is the one place the SDK reads the environment.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from lmforge._retry import RetryPolicy

DEFAULT_API_ADDR = "127.0.0.1:50051"
DEFAULT_INFERENCE_ADDR = "127.0.0.1:50052"
DEFAULT_HTTP_ADDR = "127.0.0.1:50080"
DEFAULT_TIMEOUT = 60.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Ping a connection that carries a call but no data, so a watch or a stream waiting on
    # a silent server notices a dead peer (a killed host, a dropped NAT entry) within ~50 s.
    # Our servers accept pings 10 s apart; gRPC's default server policy would need 5 min.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # Reconnect quickly after a server restart; our own retries add the backoff.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


Addresses = str | Sequence[str]


def _join(addrs: Addresses | None) -> str | None:
    if addrs is None or isinstance(addrs, str):
        return addrs
    return ",".join(addrs)


def _ip_literal(addr: str) -> str | None:
    """ "ipv4" or "ipv6" when `addr` is an IP literal with a port; None otherwise."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = "127.0.0.1" if host == "localhost" else host.removeprefix("[").removesuffix("]")
    try:
        return f"ipv{ipaddress.ip_address(host).version}"
    except ValueError:
        return None


def channel_target(addr: str) -> tuple[str, list[tuple[str, int | str]]]:
    """The gRPC target and channel options for `addr`: one address, or several separated by
    commas (replicas of one service). Several are balanced round robin by gRPC itself, so a
    call, a retry or a resumed watch goes to a replica that is up; they must be IP literals
    (one host name with several DNS records: `dns:///name:port`, balanced the same way)."""
    addrs = [a.strip() for a in addr.split(",") if a.strip()]
    if len(addrs) <= 1 and not addr.startswith("dns:"):
        return addr, CHANNEL_OPTIONS
    balanced = [*CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")]
    if len(addrs) == 1:
        return addrs[0], balanced
    kinds = {_ip_literal(a) for a in addrs}
    if None in kinds or len(kinds) != 1:
        raise ValueError(
            f"several addresses ({addr!r}) must all be IPv4 or all IPv6 literals with ports; "
            "for host names use one DNS name with several records (dns:///name:port)"
        )
    hosts = [a.replace("localhost:", "127.0.0.1:") for a in addrs]
    return f"{kinds.pop()}:{','.join(hosts)}", balanced


@dataclass(frozen=True)
class ConnectionConfig:
    api_addr: str
    inference_addr: str
    api_key: str | None
    timeout: float | None
    tls_ca_file: str | None
    retry: RetryPolicy
    # mTLS: the client's certificate chain and key (PEM), for servers that require one.
    tls_client_cert_file: str | None = None
    tls_client_key_file: str | None = None

    @classmethod
    def resolve(
        cls,
        *,
        api_addr: Addresses | None = None,
        inference_addr: Addresses | None = None,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        tls_ca_file: str | os.PathLike[str] | None = None,
        retry: RetryPolicy | None = None,
        env: Mapping[str, str] | None = None,
        tls_client_cert_file: str | os.PathLike[str] | None = None,
        tls_client_key_file: str | os.PathLike[str] | None = None,
    ) -> ConnectionConfig:
        """Arguments first, then LMFORGE_API_ADDR, LMFORGE_INFERENCE_ADDR, LMFORGE_API_KEY,
        LMFORGE_TLS_CA_FILE, LMFORGE_TLS_CLIENT_CERT_FILE and LMFORGE_TLS_CLIENT_KEY_FILE,
        then the local defaults. An address may name several replicas (a list, or one string
        with commas): calls are spread over them and fail over (see `channel_target`)."""
        env = os.environ if env is None else env
        api_addr, inference_addr = _join(api_addr), _join(inference_addr)
        return cls(
            api_addr=api_addr or env.get("LMFORGE_API_ADDR") or DEFAULT_API_ADDR,
            inference_addr=inference_addr
            or env.get("LMFORGE_INFERENCE_ADDR")
            or DEFAULT_INFERENCE_ADDR,
            api_key=api_key or env.get("LMFORGE_API_KEY") or None,
            timeout=timeout,
            tls_ca_file=str(tls_ca_file or env.get("LMFORGE_TLS_CA_FILE") or "") or None,
            retry=retry or RetryPolicy(),
            tls_client_cert_file=str(
                tls_client_cert_file or env.get("LMFORGE_TLS_CLIENT_CERT_FILE") or ""
            )
            or None,
            tls_client_key_file=str(
                tls_client_key_file or env.get("LMFORGE_TLS_CLIENT_KEY_FILE") or ""
            )
            or None,
        )

    @staticmethod
    def console_url(http_addr: str | None = None, env: Mapping[str, str] | None = None) -> str:
        """The web console's URL: the argument, then LMFORGE_HTTP_ADDR, then the default."""
        env = os.environ if env is None else env
        addr = http_addr or env.get("LMFORGE_HTTP_ADDR") or DEFAULT_HTTP_ADDR
        return addr.rstrip("/") + "/" if "://" in addr else f"http://{addr}/"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials trusting the CA file (with the client certificate for mTLS when
        one is set), or None for a plaintext channel."""
        if not self.tls_ca_file and not self.tls_client_cert_file:
            return None

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.tls_ca_file),
            private_key=read(self.tls_client_key_file),
            certificate_chain=read(self.tls_client_cert_file),
        )
