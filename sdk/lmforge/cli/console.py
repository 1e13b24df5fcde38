"""`lmforge open`: the web console's URL."""

from __future__ import annotations

import argparse
import urllib.request
import webbrowser

from lmforge import errors
from lmforge._connection import ConnectionConfig
from lmforge.cli.context import EXIT_OK
from lmforge.cli.output import print_json


def cmd_open(args: argparse.Namespace) -> int:
    url = ConnectionConfig.console_url(args.http)
    try:
        with urllib.request.urlopen(url + "healthz", timeout=5):
            pass
    except OSError as e:
        raise errors.LmforgeError(
            f"no console answering at {url} ({getattr(e, 'reason', e)}); is `lmforge up` running?"
        ) from None
    if args.json:
        print_json({"url": url})
    else:
        print(url, flush=True)
    if not args.print:
        webbrowser.open(url)
    return EXIT_OK
