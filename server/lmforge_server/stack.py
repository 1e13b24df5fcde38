"""The embedded single-machine stack: Redis, the API server, the inference server and one
worker, as child processes sharing one data directory (`lmforge up`, `lmforge demo`)."""

from __future__ import annotations

import dataclasses
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmforge_server import transport
from lmforge_server.redis_server import RedisServer, free_port
from lmforge_server.settings import Settings

BUNDLED_CORPUS = Path(__file__).parent / "data" / "tinyshakespeare.txt"
ROLES = ("api", "inference", "worker", "http")


class Child:
    """One lmforge process (`python -m lmforge_server.launch ROLE`) with its log file."""

    def __init__(self, role: str, settings: Settings, log_dir: Path):
        self.role, self.settings, self.log_path = role, settings, log_dir / f"{role}.log"
        self.process: subprocess.Popen | None = None
        self._terminated = False

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **self.settings.to_env(),
            "PYTHONUNBUFFERED": "1",
            "LMFORGE_DIE_WITH_PARENT": "1",
        }
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmforge_server.launch", self.role],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self._terminated = False
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """Asks the process to stop (SIGTERM, once) without waiting for it."""
        if self.alive() and not self._terminated:
            self.process.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        self.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait()

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


def wait_serving(
    addr: str,
    timeout: float = 60.0,
    child: Child | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Blocks until the gRPC health service at addr says SERVING (over TLS with
    `credentials`)."""
    deadline = time.monotonic() + timeout
    # Retry connecting every 20-100 ms: gRPC's default reconnect backoff (1 s, growing) kept
    # every start waiting about a second longer than the server took to come up.
    options = [
        ("grpc.initial_reconnect_backoff_ms", 20),
        ("grpc.min_reconnect_backoff_ms", 20),
        ("grpc.max_reconnect_backoff_ms", 100),
    ]
    channel = (
        grpc.secure_channel(addr, credentials, options)
        if credentials
        else grpc.insecure_channel(addr, options)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child is not None and not child.alive():
                raise RuntimeError(f"{child.role} exited early:\n{child.log_tail()}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"nothing SERVING at {addr} after {timeout}s")


def wait_http(
    url: str,
    timeout: float = 60.0,
    child: Child | None = None,
    context: ssl.SSLContext | None = None,
) -> None:
    """Blocks until GET url answers 200 (`context`: how to trust an https:// url)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.role} exited early:\n{child.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"nothing answering at {url} after {timeout}s")


def _free_addr(addr: str) -> str:
    """addr as given, or with a free port when it asks for port 0."""
    host, _, port = addr.rpartition(":")
    return f"{host}:{free_port(host)}" if port == "0" else addr


# Addresses a child listens on: port 0 is resolved here, so the parent knows them.
LISTEN_ADDRS = (
    "api_addr",
    "inference_addr",
    "http_addr",
    "api_metrics_addr",
    "inference_metrics_addr",
    "worker_metrics_addr",
)


class Stack:
    """Starts the whole stack on enter, stops it (worker first, Redis last) on exit."""

    def __init__(
        self,
        settings: Settings,
        *,
        inference: bool = True,
        worker: bool = True,
        http: bool = False,
        probe_credentials: grpc.ChannelCredentials | None = None,
    ):
        """`probe_credentials`: how to reach servers that serve TLS (the CA, and a client
        certificate under mTLS) while waiting for them to be SERVING."""
        self.probe_credentials = probe_credentials
        self.redis: RedisServer | None = None
        self.children: list[Child] = []
        wanted = {"api": True, "inference": inference, "worker": worker, "http": http}
        self._roles = [r for r in ROLES if wanted[r]]
        self._asked = settings
        self.settings = dataclasses.replace(
            settings, **{name: _free_addr(getattr(settings, name)) for name in LISTEN_ADDRS}
        )

    @property
    def api_addr(self) -> str:
        return self.settings.api_addr

    @property
    def inference_addr(self) -> str:
        return self.settings.inference_addr

    def start(self) -> Stack:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not s.redis_url:
                self.redis = RedisServer(s.data_dir / "redis").start()
                s.redis_url = self.redis.url
            for attempt in range(5):
                if self._start_children() or attempt == 4:
                    break
                # A free port we picked was taken before the server bound it: pick again.
                for child in self.children:
                    child.stop()
                for name in LISTEN_ADDRS:
                    setattr(s, name, _free_addr(getattr(self._asked, name)))
        except BaseException:
            self.stop()
            raise
        return self

    def _start_children(self) -> bool:
        """Starts the children; False when a server could not bind a port we picked."""
        s = self.settings
        log_dir = s.data_dir / "logs"
        self.children = [Child(role, s, log_dir).start() for role in self._roles]
        by_role = {c.role: c for c in self.children}
        for role, addr, asked in (
            ("api", s.api_addr, self._asked.api_addr),
            ("inference", s.inference_addr, self._asked.inference_addr),
        ):
            if role not in by_role:
                continue
            try:
                wait_serving(addr, child=by_role[role], credentials=self.probe_credentials)
            except RuntimeError:
                tail = by_role[role].log_tail()
                if asked.endswith(":0") and ("Failed to bind" in tail or "cannot listen" in tail):
                    return False
                raise
        if "http" in by_role:
            context = transport.probe_ssl_context(s) if s.tls_cert_file else None
            wait_http(s.http_url + "/healthz", child=by_role["http"], context=context)
        return True

    def stop(self) -> None:
        # All at once, so that their graceful stops overlap (the worker's, Celery's warm
        # shutdown, takes about a second); only Redis, which they all use, waits for them.
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.stop()
        self.children = []
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_up(settings: Settings, *, tls: bool = False) -> None:
    """`lmforge up`: runs the stack until Ctrl-C (SIGINT) or SIGTERM, then stops all of it.

    With `tls`, both servers serve TLS with a certificate from a CA generated (once) into
    `<data_dir>/tls`; clients trust it with `--tls-ca-file <data_dir>/tls/ca.pem`.
    """
    stop = {"now": False}

    def handle(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    probe = None
    ca_file = None
    if tls:
        from lmforge_server.certs import local_tls

        files = local_tls(settings.data_dir / "tls")
        settings = dataclasses.replace(
            settings,
            tls_cert_file=str(files.cert_file),
            tls_key_file=str(files.key_file),
            tls_ca_file=str(files.ca_file),  # the gateway reaches the servers over TLS
        )
        ca_file = files.ca_file
        probe = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
    stack = Stack(settings, http=True, probe_credentials=probe)
    stack.start()
    try:
        s = stack.settings
        print(f"lmforge is up (data in {s.data_dir})")
        if ca_file is not None:
            print(f"  tls        on; clients trust the CA in {ca_file}:")
            print(ca_file.read_text(), end="")
        print(f"  redis      {s.redis_url}" + ("  (embedded, AOF on)" if stack.redis else ""))
        print(f"  api        {s.api_addr}")
        print(f"  inference  {s.inference_addr}")
        print(f"  console    {s.http_url}/  (OpenAI-compatible API at /v1)")
        from lmforge_server.taskqueue import worker_queue

        print(f"  worker     queue {worker_queue(s)!r}, logs in {s.data_dir / 'logs'}")
        print("Ctrl-C stops everything.", flush=True)
        while not stop["now"]:
            for child in stack.children:
                if not child.alive():
                    print(f"{child.role} exited; restarting it (log: {child.log_path})", flush=True)
                    child.start()
            time.sleep(0.5)
    finally:
        print("stopping...", flush=True)
        stack.stop()
        print("stopped.", flush=True)
