"""The argument parser: every command, its flags and the function that runs it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lmforge import __version__
from lmforge.cli.console import cmd_open
from lmforge.cli.datasets import cmd_datasets
from lmforge.cli.demo import cmd_demo
from lmforge.cli.generate import cmd_abort, cmd_generate
from lmforge.cli.health import cmd_health
from lmforge.cli.jobs import cmd_jobs
from lmforge.cli.models import cmd_models
from lmforge.cli.servers import cmd_serve, cmd_up, cmd_worker
from lmforge.cli.train import cmd_train
from lmforge.types import (
    JobState,
)


def _common(json_flag: bool = True) -> argparse.ArgumentParser:
    """Flags every command takes, before or after the subcommand's name."""
    p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    p.add_argument(
        "--api",
        metavar="ADDR",
        help="API server, or replicas as IP:PORT,IP:PORT (env LMFORGE_API_ADDR; "
        "default 127.0.0.1:50051)",
    )
    p.add_argument(
        "--inference",
        metavar="ADDR",
        help="inference server, or replicas as IP:PORT,IP:PORT or dns:///NAME:PORT "
        "(env LMFORGE_INFERENCE_ADDR; default 127.0.0.1:50052)",
    )
    p.add_argument(
        "--api-key", metavar="KEY", help="sent as 'authorization: Bearer KEY' (env LMFORGE_API_KEY)"
    )
    p.add_argument(
        "--tls-ca-file", metavar="PEM", help="use TLS, trusting this CA (env LMFORGE_TLS_CA_FILE)"
    )
    p.add_argument(
        "--tls-client-cert",
        metavar="PEM",
        help="client certificate for mTLS (env LMFORGE_TLS_CLIENT_CERT_FILE)",
    )
    p.add_argument(
        "--tls-client-key", metavar="PEM", help="its key (env LMFORGE_TLS_CLIENT_KEY_FILE)"
    )
    p.add_argument(
        "--timeout", type=float, metavar="S", help="deadline of each call in seconds (default 60)"
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
    return p


def _server_flags(p: argparse.ArgumentParser, *, bind: bool = True) -> None:
    p.add_argument(
        "--data-dir",
        help="where Redis, artifacts and logs live (env LMFORGE_DATA_DIR; default ./.lmforge)",
    )
    p.add_argument(
        "--redis-url",
        help="an existing Redis (env LMFORGE_REDIS_URL; default: start one in the data dir)",
    )
    p.add_argument(
        "--artifacts",
        help="artifact store: a directory or s3://bucket/prefix (env LMFORGE_ARTIFACTS; "
        "default DATA_DIR/artifacts; S3 endpoint, region and keys from LMFORGE_S3_*)",
    )
    p.add_argument("--device", help="training device: auto, cpu, cuda[:N] (env LMFORGE_DEVICE)")
    _security_flags(p, bind=bind)
    if bind:
        p.add_argument(
            "--api-addr", help="address the API server listens on (env LMFORGE_API_ADDR)"
        )
        p.add_argument(
            "--inference-addr",
            help="address the inference server listens on (env LMFORGE_INFERENCE_ADDR)",
        )
        p.add_argument(
            "--http-addr",
            help="address the HTTP gateway (console, OpenAI API) listens on (env LMFORGE_HTTP_ADDR)",
        )


def _security_flags(p: argparse.ArgumentParser, *, bind: bool) -> None:
    """Keys and TLS of the servers (each also an LMFORGE_* variable)."""
    if not bind:
        return
    p.add_argument(
        "--api-keys-file",
        help="API keys, one key:tenant[:scopes] per line (env LMFORGE_API_KEYS_FILE)",
    )
    p.add_argument(
        "--tls-cert-file", help="server certificate chain, PEM (env LMFORGE_TLS_CERT_FILE)"
    )
    p.add_argument("--tls-key-file", help="server private key, PEM (env LMFORGE_TLS_KEY_FILE)")
    p.add_argument(
        "--tls-client-ca-file",
        help="require client certificates signed by this CA: mTLS (env LMFORGE_TLS_CLIENT_CA_FILE)",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve a non-loopback address without API keys (refused otherwise)",
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="lmforge",
        # `up --tls` must not read as an abbreviation of --tls-ca-file.
        allow_abbrev=False,
        description="Train GPT-style language models on your own text and serve them over gRPC.",
        parents=[common],
        epilog="Exit codes: 0 ok, 1 error or failed job, 2 usage, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, help: str, func: Callable[[argparse.Namespace], int], **kw: Any
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common], **kw)
        p.set_defaults(func=func)
        return p

    p = add(
        "up", "run Redis, the API server, the inference server and a worker until Ctrl-C", cmd_up
    )
    _server_flags(p)
    p.add_argument(
        "--tls", action="store_true", help="serve TLS with a CA generated into DATA_DIR/tls"
    )
    p = add("demo", "train a small model on Tiny Shakespeare and stream a sample from it", cmd_demo)
    _server_flags(p)
    p.add_argument("--preset", default="small", help="model/training preset (default small)")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed")
    p = add("serve", "run one server (needs a Redis: --redis-url)", cmd_serve)
    p.add_argument("role", choices=["api", "inference", "http"])
    _server_flags(p)
    p = add("worker", "run a training worker (Celery, queue 'gpu')", cmd_worker)
    _server_flags(p, bind=False)

    p = add("train", "upload a text file and start a training job on it", cmd_train)
    p.add_argument("file", help="a UTF-8 text file (or the id of a dataset already uploaded)")
    p.add_argument(
        "--preset", help="tiny, small, baby or gpt2-small (default: the server's, small)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a spec field: model.n_layers=4, training.max_steps=100 (repeatable)",
    )
    p.add_argument("--name", help="the model name to register (default: from the file name)")
    p.add_argument("--dataset-name", help="the dataset's name (default: the file name)")
    p.add_argument("--request-id", help="idempotency key: the same key gives the same job")
    p.add_argument(
        "--validation-dataset",
        metavar="FILE_OR_ID",
        help="evaluate on this text file or dataset id instead of a split of FILE",
    )
    p.add_argument(
        "--validate-only",
        action="store_true",
        help="print what the job would do (tokens, FLOPs, memory, time) and its problems; "
        "start nothing (exit 1 when problems were found)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the job, with a progress bar; exit 1 if it fails",
    )

    p = add("datasets", "list, upload, show or delete datasets", cmd_datasets)
    p.add_argument("action", choices=["list", "upload", "get", "delete"])
    p.add_argument("id", nargs="?", help="dataset id (a file path for upload)")
    p.add_argument("--name", help="dataset name (upload)")

    p = add(
        "jobs",
        "list, show, watch, wait for, pause, resume or cancel jobs; metrics, checkpoints, export",
        cmd_jobs,
    )
    p.add_argument(
        "action",
        choices=["list", "get", "watch", "wait", "cancel", "pause", "resume", "metrics"]
        + ["checkpoints", "export"],
    )
    p.add_argument("--step", type=int, help="export: the checkpoint's step (see checkpoints)")
    p.add_argument("--model-name", help="export: the model to register (default: the job's)")
    p.add_argument("--csv", action="store_true", help="metrics: write CSV to stdout")
    p.add_argument("id", nargs="?", help="job id")
    p.add_argument(
        "--state",
        type=str.upper,
        choices=[s.value for s in JobState if s is not JobState.UNSPECIFIED],
        help="list: only jobs in this state",
    )
    p.add_argument("--after", metavar="EVENT_ID", help="watch: only events after this one")
    p.add_argument("--wait-timeout", type=float, metavar="S", help="wait: give up after S seconds")

    p = add("models", "list, show, delete or download models", cmd_models)
    p.add_argument("action", choices=["list", "get", "delete", "download"])
    p.add_argument("id", nargs="?", help="model id, name@version or name")
    p.add_argument("dir", nargs="?", help="download: the directory to write the files into")
    p.add_argument("--name", help="list: only versions of this name")

    p = add("generate", "generate text from a model (streams by default)", cmd_generate)
    p.add_argument("model", help="model id, name@version or name")
    p.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    p.add_argument("--max-tokens", type=int, help="tokens to generate at most (server default 64)")
    p.add_argument("--temperature", type=float, help="0 is greedy (server default 1.0)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, help="same seed, same text")
    p.add_argument(
        "--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)"
    )
    p.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="keep the end of a prompt longer than the context",
    )
    p.add_argument("--no-stream", action="store_true", help="print the whole completion at the end")
    p.add_argument("--n", type=int, help="samples to generate from one prefill (default 1)")
    p.add_argument("--request-id", default="", help="an id of yours, echoed; `abort` takes it")
    p.add_argument(
        "--context-shift",
        action="store_true",
        help="keep generating past the context by re-reading its most recent half",
    )
    p.add_argument(
        "--variant", default="", help="the graph to run: fp32, int8, int4 (default: served)"
    )
    p.set_defaults(server="inference")

    p = add("abort", "end a generation started with --request-id", cmd_abort)
    p.add_argument("request_id", help="the --request-id the generation was started with")
    p.set_defaults(server="inference")

    p = add("open", "open the web console in a browser (prints its URL)", cmd_open)
    p.add_argument(
        "--http",
        metavar="ADDR",
        help="the gateway (env LMFORGE_HTTP_ADDR; default 127.0.0.1:50080)",
    )
    p.add_argument("--print", action="store_true", help="only print the URL")

    p = add("health", "ask a server's gRPC health service whether it is SERVING", cmd_health)
    p.add_argument("addr", nargs="?", help="host:port (default: the API server)")
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    return parser


_NEEDS_ID = {("datasets", "get"), ("datasets", "delete"), ("datasets", "upload"), ("jobs", "get"), ("jobs", "watch"),
             ("jobs", "wait"), ("jobs", "cancel"), ("models", "get"), ("models", "delete"),
             ("jobs", "pause"), ("jobs", "resume"), ("jobs", "metrics"), ("models", "download"),
             ("jobs", "checkpoints"), ("jobs", "export")}  # fmt: skip
