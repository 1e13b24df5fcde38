"""`python -m lmforge_server.launch api|inference|worker`: one stack process, configured by
the LMFORGE_* environment its parent (lmforge_server.stack) passes down."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from lmforge_server.settings import Settings


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent (the stack) dies, so nothing is left
    running. Done here rather than in a preexec_fn: that would force a full fork() of a
    parent holding gRPC channels, which gRPC's fork handlers do not survive."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(role: str) -> None:
    if os.environ.get("LMFORGE_DIE_WITH_PARENT") == "1":
        _die_with_parent()
    settings = Settings.from_env()
    if role == "api":
        from lmforge_server.api import run

        run(settings)
    elif role == "inference":
        from lmforge_server.inference.server import run

        run(settings)
    elif role == "http":
        from lmforge_server.http.app import run

        run(settings)
    elif role == "worker":
        from lmforge_worker.app import run_worker

        run_worker(settings)
    else:
        raise SystemExit(f"unknown role {role!r}; expected api, inference, worker or http")


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    from lmforge_server.lifecycle import exit_process

    try:
        main(sys.argv[1] if len(sys.argv) > 1 else "")
    except SystemExit as e:  # Celery's worker_main ends with one, exit code and all
        exit_process(_exit_code(e))
    exit_process(0)
