"""The embedded single-machine stack: Redis, the API server, the inference server and one
worker, as child processes sharing one data directory (`lmforge up`, `lmforge demo`)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmforge_server.redis_server import RedisServer, free_port
from lmforge_server.settings import Settings

BUNDLED_CORPUS = Path(__file__).parent / "data" / "tinyshakespeare.txt"
ROLES = ("api", "inference", "worker")


class Child:
    """One lmforge process (`python -m lmforge_server.launch ROLE`) with its log file."""

    def __init__(self, role: str, settings: Settings, log_dir: Path):
        self.role, self.settings, self.log_path = role, settings, log_dir / f"{role}.log"
        self.process: subprocess.Popen | None = None

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
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
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
    channel = grpc.secure_channel(addr, credentials) if credentials else grpc.insecure_channel(addr)
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
            time.sleep(0.1)
    raise TimeoutError(f"nothing SERVING at {addr} after {timeout}s")


def _free_addr(addr: str) -> str:
    """addr as given, or with a free port when it asks for port 0."""
    host, _, port = addr.rpartition(":")
    return f"{host}:{free_port(host)}" if port == "0" else addr


class Stack:
    """Starts the whole stack on enter, stops it (worker first, Redis last) on exit."""

    def __init__(
        self,
        settings: Settings,
        *,
        inference: bool = True,
        worker: bool = True,
        probe_credentials: grpc.ChannelCredentials | None = None,
    ):
        """`probe_credentials`: how to reach servers that serve TLS (the CA, and a client
        certificate under mTLS) while waiting for them to be SERVING."""
        self.probe_credentials = probe_credentials
        self.redis: RedisServer | None = None
        self.children: list[Child] = []
        self._roles = [
            r for r in ROLES if (r != "inference" or inference) and (r != "worker" or worker)
        ]
        self.settings = dataclasses.replace(
            settings,
            api_addr=_free_addr(settings.api_addr),
            inference_addr=_free_addr(settings.inference_addr),
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
            log_dir = s.data_dir / "logs"
            self.children = [Child(role, s, log_dir).start() for role in self._roles]
            by_role = {c.role: c for c in self.children}
            creds = self.probe_credentials
            wait_serving(s.api_addr, child=by_role["api"], credentials=creds)
            if "inference" in by_role:
                wait_serving(s.inference_addr, child=by_role["inference"], credentials=creds)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for child in sorted(self.children, key=lambda c: c.role != "worker"):
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
            settings, tls_cert_file=str(files.cert_file), tls_key_file=str(files.key_file)
        )
        ca_file = files.ca_file
        probe = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
    stack = Stack(settings, probe_credentials=probe)
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
        print(f"  worker     queue {s.train_queue!r}, logs in {s.data_dir / 'logs'}")
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
