"""`lmforge`: the command line for the SDK and, with the server extras, the servers.

Exit codes: 0 success, 1 an error or a job that failed, 2 bad usage, 130 interrupted.
Output is for people by default; `--json` prints JSON for scripts (JSON Lines for streams).

One module per command group (train, datasets, jobs, models, generate, health, servers,
console, demo), with the parser, the shared context and the output helpers beside them.
"""

from lmforge.cli.context import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    parse_overrides,
)
from lmforge.cli.health import check_health
from lmforge.cli.main import main
from lmforge.cli.parser import build_parser

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "check_health",
    "main",
    "parse_overrides",
]
