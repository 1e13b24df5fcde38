"""`python -m lmforge_server.launch api|inference|worker`: one stack process, configured by
the LMFORGE_* environment its parent (lmforge_server.stack) passes down."""

from __future__ import annotations

import sys

from lmforge_server.settings import Settings


def main(role: str) -> None:
    settings = Settings.from_env()
    if role == "api":
        from lmforge_server.api import run

        run(settings)
    elif role == "inference":
        from lmforge_server.inference.server import run

        run(settings)
    elif role == "worker":
        from lmforge_worker.app import run_worker

        run_worker(settings)
    else:
        raise SystemExit(f"unknown role {role!r}; expected api, inference or worker")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
