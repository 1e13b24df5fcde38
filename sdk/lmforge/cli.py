"""`lmforge`: the command line for the SDK and, with the server extras, the servers.

Exit codes: 0 success, 1 an error or a job that failed, 2 bad usage, 130 interrupted.
Output is for people by default; `--json` prints JSON for scripts (JSON Lines for streams).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import grpc

from lmforge import __version__, errors
from lmforge._connection import ConnectionConfig
from lmforge._progress import describe, format_duration, format_rate
from lmforge.client import Client
from lmforge.types import (
    Completion,
    Dataset,
    FinishReason,
    Job,
    JobEvent,
    JobState,
    Model,
    ModelSpec,
    Timings,
    TrainingSpec,
    Usage,
)
from lmforge.v1 import common_pb2

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXTRAS_HINT = "pip install 'lmforge[all]'"


class UsageError(Exception):
    """Bad arguments that argparse cannot see (exit code 2)."""


# ---------------------------------------------------------------- output


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def print_json(value: Any) -> None:
    print(json.dumps(_jsonable(value), indent=None, ensure_ascii=False), flush=True)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    rows = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for row in [list(headers), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_fields(value: Any) -> None:
    """A result as "key: value" lines, nested fields dotted, unset ones left out."""
    flat: list[tuple[str, Any]] = []

    def walk(prefix: str, v: Any) -> None:
        if dataclasses.is_dataclass(v):
            for f in dataclasses.fields(v):
                walk(f"{prefix}{f.name}.", getattr(v, f.name))
        elif v is not None and v != "" and v != [] and (v is True or v is False or v != 0):
            flat.append((prefix[:-1], _human(v)))

    walk("", value)
    width = max((len(k) for k, _ in flat), default=0)
    for key, v in flat:
        print(f"{key.ljust(width)}  {v}")


def _human(v: Any) -> str:
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, datetime):
        return _when(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def _when(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else ""


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def describe_parameters(job: Job | Model) -> str:
    p = job.parameters
    return (
        f"{p.total:,} parameters ({human_count(p.total)}): embedding {human_count(p.embedding)}, "
        f"attention {human_count(p.attention)}, MLP {human_count(p.mlp)}, norm {human_count(p.norm)}"
    )


# ---------------------------------------------------------------- --set key=value

_SPECS: dict[str, tuple[type, Any]] = {
    "model": (ModelSpec, common_pb2.ModelSpec.DESCRIPTOR),
    "training": (TrainingSpec, common_pb2.TrainingSpec.DESCRIPTOR),
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _typed(field: Any, key: str, raw: str) -> Any:
    fd = field
    try:
        if fd.cpp_type in (
            fd.CPPTYPE_INT32,
            fd.CPPTYPE_INT64,
            fd.CPPTYPE_UINT32,
            fd.CPPTYPE_UINT64,
        ):
            return int(raw.replace("_", ""))
        if fd.cpp_type in (fd.CPPTYPE_FLOAT, fd.CPPTYPE_DOUBLE):
            return float(raw)
    except ValueError:
        kind = "a number" if fd.cpp_type in (fd.CPPTYPE_FLOAT, fd.CPPTYPE_DOUBLE) else "an integer"
        raise UsageError(f"--set {key}={raw}: expected {kind}") from None
    if fd.cpp_type == fd.CPPTYPE_BOOL:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise UsageError(f"--set {key}={raw}: expected true or false")
    return raw


def parse_overrides(pairs: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """["model.n_layers=4", "max_steps=100"] -> ({"n_layers": 4}, {"max_steps": 100}), each
    value typed by its proto field; a bare name must belong to only one of the two specs."""
    found: dict[str, dict[str, Any]] = {"model": {}, "training": {}}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {pair}: expected key=value, e.g. training.max_steps=100")
        section, _, name = key.rpartition(".")
        sections = (
            [section]
            if section
            else [s for s, (_, d) in _SPECS.items() if name in d.fields_by_name]
        )
        if section and section not in _SPECS:
            raise UsageError(f"--set {key}: the prefix must be model. or training.")
        if not sections or name not in _SPECS[sections[0]][1].fields_by_name:
            known = [f"{s}.{n}" for s, (_, d) in _SPECS.items() for n in d.fields_by_name]
            close = difflib.get_close_matches(key, known + [k.split(".")[1] for k in known], n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UsageError(f"--set {key}: no such spec field{hint}")
        if len(sections) > 1:
            raise UsageError(f"--set {key}: ambiguous; write model.{name} or training.{name}")
        fd = _SPECS[sections[0]][1].fields_by_name[name]
        found[sections[0]][name] = _typed(fd, key, raw.strip())
    return found["model"], found["training"]


# ---------------------------------------------------------------- client commands


def _client(args: argparse.Namespace) -> Client:
    return Client(
        api_addr=args.api,
        inference_addr=args.inference,
        api_key=args.api_key,
        timeout=args.timeout,
        tls_ca_file=args.tls_ca_file,
        tls_client_cert_file=args.tls_client_cert,
        tls_client_key_file=args.tls_client_key,
    )


def _bar_wanted(args: argparse.Namespace) -> bool:
    return not args.json and sys.stderr.isatty()


def cmd_train(args: argparse.Namespace) -> int:
    model, training = parse_overrides(args.set or [])
    with _client(args) as client:
        path = Path(args.file)
        if path.is_file():
            dataset = client.datasets.upload(path, name=args.dataset_name)
            if not args.json:
                print(f"dataset  {dataset.id}  {dataset.name}  ({human_bytes(dataset.size_bytes)})")
        elif len(args.file) == 64 and all(c in "0123456789abcdef" for c in args.file):
            dataset = client.datasets.get(args.file)
        else:
            raise UsageError(f"{args.file}: no such file (nor a dataset id)")
        job = client.jobs.create(
            dataset=dataset,
            preset=args.preset or "",
            model=model,
            training=training,
            model_name=args.name or "",
            request_id=args.request_id,
        )
        if not args.json:
            print(f"job      {job.id}  {job.state.value}  model {job.model_name}")
            print(f"         {describe_parameters(job)}")
        if args.wait:
            try:
                job = client.jobs.wait(job.id, progress=_bar_wanted(args))
            except errors.JobFailedError as e:
                _emit_job_end(args, e.job)
                return EXIT_ERROR
            _emit_job_end(args, job)
        elif args.json:
            print_json(job)
    return EXIT_OK


def _emit_job_end(args: argparse.Namespace, job: Job) -> None:
    if args.json:
        print_json(job)
    elif job.state is JobState.SUCCEEDED:
        p = job.progress
        extra = f", val loss {p.best_val_loss:.4f}" if p.best_val_loss else ""
        print(f"job      {job.id}  SUCCEEDED in {format_duration(p.elapsed_seconds)}{extra}")
        print(f"model    {job.model_id}")
    else:
        detail = f": {job.error}" if job.error else ""
        print(f"job {job.id} {job.state.value}{detail}", file=sys.stderr)


def cmd_datasets(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            items = list(client.datasets.list())
            if args.json:
                print_json(items)
            else:
                print_table(
                    ["ID", "NAME", "SIZE", "CHARS", "CREATED"],
                    [
                        (
                            d.id,
                            d.name,
                            human_bytes(d.size_bytes),
                            f"{d.num_chars:,}",
                            _when(d.created_at),
                        )
                        for d in items
                    ],
                )
        elif args.action == "upload":
            dataset = client.datasets.upload(args.id, name=args.name)
            if args.json:
                print_json(dataset)
            else:
                print(dataset.id)
        elif args.action == "get":
            dataset: Dataset = client.datasets.get(args.id)
            if args.json:
                print_json(dataset)
            else:
                print_fields(dataset)
        elif args.action == "delete":
            client.datasets.delete(args.id)
            if args.json:
                print_json({"deleted": args.id})
            else:
                print(f"deleted {args.id}")
    return EXIT_OK


def _job_row(j: Job) -> tuple:
    p = j.progress
    step = f"{p.step}/{p.total_steps}" if p.total_steps else ""
    return (
        j.id,
        j.state.value,
        j.model_name,
        j.spec.preset,
        step,
        f"{p.loss:.4f}" if p.loss else "",
        _when(j.created_at),
    )


def _event_line(ev: JobEvent) -> str:
    p = ev.progress
    step = f"step {p.step}/{p.total_steps}" if p.total_steps else ""
    parts = [
        _when(ev.time),
        ev.state.value.ljust(10),
        ev.type.value.lower().ljust(10),
        step,
        describe(p),
        ev.message,
    ]
    return "  ".join(x for x in parts if x)


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            jobs = list(client.jobs.list(state=args.state))
            if args.json:
                print_json(jobs)
            else:
                print_table(
                    ["ID", "STATE", "MODEL", "PRESET", "STEP", "LOSS", "CREATED"],
                    map(_job_row, jobs),
                )
        elif args.action == "get":
            job = client.jobs.get(args.id)
            if args.json:
                print_json(job)
            else:
                print_fields(job)
        elif args.action == "cancel":
            job = client.jobs.cancel(args.id)
            if args.json:
                print_json(job)
            else:
                print(f"{job.id}  {job.state.value}")
        elif args.action == "watch":
            last: JobEvent | None = None
            for last in client.jobs.watch(args.id, after_event_id=args.after or ""):
                if args.json:
                    print_json(last)
                else:
                    print(_event_line(last), flush=True)
            if last is not None and last.terminal and last.state is not JobState.SUCCEEDED:
                return EXIT_ERROR
        elif args.action == "wait":
            try:
                job = client.jobs.wait(
                    args.id, timeout=args.wait_timeout, progress=_bar_wanted(args)
                )
            except errors.JobFailedError as e:
                _emit_job_end(args, e.job)
                return EXIT_ERROR
            _emit_job_end(args, job)
    return EXIT_OK


def _model_row(m: Model) -> tuple:
    return (
        m.id,
        m.name,
        m.version,
        m.state.value,
        human_count(m.parameters.total) if m.parameters.total else "",
        f"{m.val_loss:.4f}" if m.val_loss else "",
        _when(m.created_at),
    )


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            models = list(client.models.list(name=args.name))
            if args.json:
                print_json(models)
            else:
                print_table(
                    ["ID", "NAME", "VERSION", "STATE", "PARAMS", "VAL LOSS", "CREATED"],
                    map(_model_row, models),
                )
        elif args.action == "get":
            model = client.models.get(args.id)
            if args.json:
                print_json(model)
            else:
                print_fields(model)
        elif args.action == "delete":
            client.models.delete(args.id)
            if args.json:
                print_json({"deleted": args.id})
            else:
                print(f"deleted {args.id}")
    return EXIT_OK


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or None,
        truncate_prompt=args.truncate_prompt,
    )


def _stats(c: Completion | Any) -> str:
    t, u = c.timings, c.usage
    return (
        f"[{c.finish_reason.value} · {u.completion_tokens} tokens · "
        f"{format_rate(t.tokens_per_second)} · first token {t.time_to_first_token_ms:.0f} ms]"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    with _client(args) as client:
        if args.no_stream:
            completion = client.generate(args.model, prompt, **_sampling(args))
            if args.json:
                print_json(completion)
            else:
                print(completion.text)
                if sys.stderr.isatty():
                    print(_stats(completion), file=sys.stderr)
            return EXIT_OK
        with client.stream(args.model, prompt, **_sampling(args)) as stream:
            for delta in stream:
                if args.json:
                    print_json(delta)
                else:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
        if not args.json:
            print()
            if stream.final and sys.stderr.isatty():
                print(_stats(stream.final), file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- health

_HEALTH = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def check_health(
    addr: str, service: str = "", *, timeout: float = 5.0, tls_ca_file: str | None = None
) -> str:
    """The gRPC health service's answer at addr ("SERVING", ...), without grpcio-health-checking:
    HealthCheckRequest is one string field and HealthCheckResponse one enum field, so the
    bytes are written and read by hand."""
    name = service.encode()
    request = (b"\x0a" + _varint(len(name)) + name) if name else b""
    creds = grpc.ssl_channel_credentials(Path(tls_ca_file).read_bytes()) if tls_ca_file else None
    channel = grpc.secure_channel(addr, creds) if creds else grpc.insecure_channel(addr)
    with channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            response = check(request, timeout=timeout)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from e
    status = response[1] if len(response) >= 2 and response[0] == 0x08 else 0
    return _HEALTH.get(status, "UNKNOWN")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def cmd_health(args: argparse.Namespace) -> int:
    addr = args.addr or _client(args).api_addr
    status = check_health(
        addr, args.service, timeout=args.timeout or 5.0, tls_ca_file=args.tls_ca_file
    )
    if args.json:
        print_json({"addr": addr, "status": status})
    else:
        print(f"{addr}  {status}")
    return EXIT_OK if status == "SERVING" else EXIT_ERROR


# ---------------------------------------------------------------- server commands


class MissingExtras(Exception):
    def __init__(self, command: str, error: ImportError):
        super().__init__(
            f"`lmforge {command}` needs the server extras ({error.name or error} is missing): "
            f"{EXTRAS_HINT}"
        )


def _server_settings(args: argparse.Namespace, **forced: Any) -> Any:
    try:
        from lmforge_server.settings import Settings
    except ImportError as e:
        raise MissingExtras(args.command, e) from e
    names = ("data_dir", "redis_url", "artifacts", "api_addr", "inference_addr", "device")
    names += ("api_keys_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file")
    flags = {name: getattr(args, name, None) for name in names}
    if getattr(args, "allow_unauthenticated", False):
        flags["allow_unauthenticated"] = True
    return Settings.from_env(**{**flags, **forced})


def cmd_up(args: argparse.Namespace) -> int:
    settings = _server_settings(args)
    try:
        from lmforge_server.stack import run_up
    except ImportError as e:
        raise MissingExtras("up", e) from e
    run_up(settings, tls=getattr(args, "tls", False))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _server_settings(args)
    try:
        if args.role == "api":
            from lmforge_server.api import run
        else:
            from lmforge_server.inference.server import run
    except ImportError as e:
        raise MissingExtras(f"serve {args.role}", e) from e
    run(settings)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _server_settings(args)
    try:
        from lmforge_worker.app import run_worker
    except ImportError as e:
        raise MissingExtras("worker", e) from e
    run_worker(settings)
    return EXIT_OK


DEMO_PROMPT = "ROMEO:\n"
DEMO_TOKENS = 300


def stream_passage(client: Client, job: Job, prompt: str, tokens: int, *, seed: int) -> Completion:
    """Streams `tokens` tokens to stdout, longer than the model's context if need be: each
    call continues from the last half-context of text (the server generates at most up to
    the context length per call)."""
    half = max(1, job.spec.model.context_length // 2)
    text, done, calls, last = prompt, 0, 0, None
    while done < tokens:
        # Characters >= tokens for every tokenizer, so this tail fits in half the context.
        with client.stream(
            job.model_id, text[-half:], max_tokens=tokens - done, temperature=0.8,
            seed=seed + calls, truncate_prompt=True,
        ) as stream:  # fmt: skip
            for delta in stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        last, calls = stream.final, calls + 1
        text += stream.text
        produced = last.usage.completion_tokens if last and last.usage else 0
        done += produced
        if not produced or (last and last.finish_reason in (FinishReason.EOS, FinishReason.STOP)):
            break
    usage = Usage(prompt_tokens=len(prompt), completion_tokens=done)
    timings = last.timings if last and last.timings else Timings()
    finish = last.finish_reason if last and last.finish_reason else FinishReason.LENGTH
    return Completion(
        last.model_id if last else job.model_id, text[len(prompt) :], [], [], finish, usage, timings
    )


def cmd_demo(args: argparse.Namespace) -> int:
    # Free ports of its own, so the demo runs beside an `lmforge up` already listening.
    settings = _server_settings(
        args,
        api_addr=args.api_addr or "127.0.0.1:0",
        inference_addr=args.inference_addr or "127.0.0.1:0",
    )
    try:
        from lmforge_server.stack import BUNDLED_CORPUS, Stack
    except ImportError as e:
        raise MissingExtras("demo", e) from e
    print(
        f"Starting Redis, the API server, the inference server and a worker in {settings.data_dir} ..."
    )
    with Stack(settings) as stack:
        with Client(
            api_addr=stack.api_addr, inference_addr=stack.inference_addr, api_key=args.api_key
        ) as client:
            dataset = client.datasets.upload(BUNDLED_CORPUS, name="tinyshakespeare")
            print(
                f"Uploaded {dataset.name}: {human_bytes(dataset.size_bytes)}, {dataset.num_chars:,} characters, "
                f"{dataset.num_distinct_chars} distinct."
            )
            job = client.jobs.create(dataset=dataset, preset=args.preset, model_name="shakespeare")
            m = job.spec.model
            print(
                f"Training job {job.id} (preset {job.spec.preset!r}): {m.n_layers} layers, {m.n_heads} heads, "
                f"width {m.d_model}, context {m.context_length}, {m.tokenizer} tokenizer."
            )
            print(f"The model has {describe_parameters(job)}.")
            try:
                job = client.jobs.wait(job.id, progress=True)
            except errors.JobFailedError as e:
                print(f"Training failed: {e}", file=sys.stderr)
                return EXIT_ERROR
            p = job.progress
            val = f"; validation loss {p.best_val_loss:.3f}" if p.best_val_loss else ""
            print(
                f"Trained {p.step} steps in {format_duration(p.elapsed_seconds)}{val}. Model {job.model_id}."
            )
            print(f"\nSampling {DEMO_TOKENS} tokens at temperature 0.8 from {DEMO_PROMPT!r}:\n")
            sys.stdout.write(DEMO_PROMPT)
            passage = stream_passage(client, job, DEMO_PROMPT, DEMO_TOKENS, seed=args.seed)
            print("\n")
            print(_stats(passage))
    print(
        f"\nThe model stays in {settings.data_dir}: run `lmforge up`, then `lmforge generate shakespeare 'JULIET:'`."
    )
    return EXIT_OK


# ---------------------------------------------------------------- parser


def _common(json_flag: bool = True) -> argparse.ArgumentParser:
    """Flags every command takes, before or after the subcommand's name."""
    p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    p.add_argument(
        "--api", metavar="ADDR", help="API server (env LMFORGE_API_ADDR; default 127.0.0.1:50051)"
    )
    p.add_argument(
        "--inference",
        metavar="ADDR",
        help="inference server (env LMFORGE_INFERENCE_ADDR; default 127.0.0.1:50052)",
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
        "--artifacts", help="artifact store (env LMFORGE_ARTIFACTS; default DATA_DIR/artifacts)"
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
    p.add_argument("role", choices=["api", "inference"])
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
        "--wait",
        action="store_true",
        help="wait for the job, with a progress bar; exit 1 if it fails",
    )

    p = add("datasets", "list, upload, show or delete datasets", cmd_datasets)
    p.add_argument("action", choices=["list", "upload", "get", "delete"])
    p.add_argument("id", nargs="?", help="dataset id (a file path for upload)")
    p.add_argument("--name", help="dataset name (upload)")

    p = add("jobs", "list, show, watch, wait for or cancel training jobs", cmd_jobs)
    p.add_argument("action", choices=["list", "get", "watch", "wait", "cancel"])
    p.add_argument("id", nargs="?", help="job id")
    p.add_argument(
        "--state",
        type=str.upper,
        choices=[s.value for s in JobState if s is not JobState.UNSPECIFIED],
        help="list: only jobs in this state",
    )
    p.add_argument("--after", metavar="EVENT_ID", help="watch: only events after this one")
    p.add_argument("--wait-timeout", type=float, metavar="S", help="wait: give up after S seconds")

    p = add("models", "list, show or delete models", cmd_models)
    p.add_argument("action", choices=["list", "get", "delete"])
    p.add_argument("id", nargs="?", help="model id, name@version or name")
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
    p.set_defaults(server="inference")

    p = add("health", "ask a server's gRPC health service whether it is SERVING", cmd_health)
    p.add_argument("addr", nargs="?", help="host:port (default: the API server)")
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    return parser


_NEEDS_ID = {("datasets", "get"), ("datasets", "delete"), ("datasets", "upload"), ("jobs", "get"), ("jobs", "watch"),
             ("jobs", "wait"), ("jobs", "cancel"), ("models", "get"), ("models", "delete")}  # fmt: skip


def _server_of(args: argparse.Namespace) -> str:
    """Which server a command talks to, with its address, for error messages."""
    if args.command == "health" and args.addr:
        return args.addr
    config = ConnectionConfig.resolve(api_addr=args.api, inference_addr=args.inference)
    if getattr(args, "server", "api") == "inference":
        return f"the inference server at {config.inference_addr}"
    return f"the API server at {config.api_addr}"


def _fail(message: str) -> None:
    print(f"lmforge: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The `lmforge` entry point; always exits via SystemExit with the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in (
        "api",
        "inference",
        "api_key",
        "tls_ca_file",
        "tls_client_cert",
        "tls_client_key",
        "timeout",
    ):
        setattr(args, name, getattr(args, name, None))
    args.json = getattr(args, "json", False)
    if (args.command, getattr(args, "action", None)) in _NEEDS_ID and not args.id:
        parser.error(f"{args.command} {args.action} needs an id")
    try:
        code = args.func(args)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        _fail(str(e))
        code = EXIT_USAGE
    except MissingExtras as e:
        _fail(str(e))
        code = EXIT_ERROR
    except errors.UnavailableError as e:
        _fail(f"cannot reach {_server_of(args)} ({e.message}); is `lmforge up` running?")
        code = EXIT_ERROR
    except errors.LmforgeError as e:
        _fail(str(e))
        code = EXIT_ERROR
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        _fail(f"{e.filename}: {e.strerror}")
        code = EXIT_ERROR
    except KeyboardInterrupt:
        _fail("interrupted")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:  # `lmforge ... | head`
        sys.stderr.close()
        code = EXIT_OK
    sys.exit(code)


if __name__ == "__main__":
    main()
