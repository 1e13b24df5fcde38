"""`lmforge jobs list|get|watch|wait|cancel|pause|resume|metrics`."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys

from lmforge import errors
from lmforge._progress import describe
from lmforge.cli.context import EXIT_ERROR, EXIT_OK, UsageError, _bar_wanted, _client
from lmforge.cli.output import _when, print_fields, print_json, print_table
from lmforge.cli.train import _emit_job_end
from lmforge.types import (
    Job,
    JobEvent,
    JobState,
    MetricRow,
)


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
        _when(p.estimated_finish) if not j.state.terminal else "",
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
                    ["ID", "STATE", "MODEL", "PRESET", "STEP", "LOSS", "CREATED", "FINISH (EST.)"],
                    map(_job_row, jobs),
                )
        elif args.action == "get":
            job = client.jobs.get(args.id)
            if args.json:
                print_json(job)
            else:
                print_fields(job)
        elif args.action in ("cancel", "pause", "resume"):
            job = getattr(client.jobs, args.action)(args.id)
            if args.json:
                print_json(job)
            else:
                print(f"{job.id}  {job.state.value}")
        elif args.action == "checkpoints":
            kept = client.jobs.checkpoints(args.id)
            if args.json:
                print_json(kept)
            else:
                print_table(
                    ["REF", "STEP", "TRAIN LOSS", "VAL LOSS", "VAL STEP", "CREATED"],
                    (
                        (c.ref, c.step, f"{c.train_loss:.4f}",
                         f"{c.val_loss:.4f}" if c.val_step else "", c.val_step or "",
                         _when(c.created_at))
                        for c in kept
                    ),
                )  # fmt: skip
        elif args.action == "export":
            if args.step is None:
                raise UsageError("jobs export needs --step (see lmforge jobs checkpoints JOB)")
            job = client.jobs.export_checkpoint(
                args.id, args.step, model_name=args.model_name or ""
            )
            if args.json:
                print_json(job)
            else:
                print(f"{job.id}  {job.state.value}  exporting {job.export_of}")
                print(f"         lmforge jobs wait {job.id}  (registers {job.model_name})")
        elif args.action == "metrics":
            _print_metrics(client.jobs.metrics(args.id), args)
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


def _print_metrics(rows: list[MetricRow], args: argparse.Namespace) -> None:
    """`jobs metrics`: CSV (--csv; empty cells where a step was not evaluated), JSON or a table."""
    if args.csv:
        out = csv.writer(sys.stdout, lineterminator="\n")
        columns = [f.name for f in dataclasses.fields(MetricRow)]
        out.writerow(columns)
        for row in rows:
            out.writerow(["" if getattr(row, c) is None else getattr(row, c) for c in columns])
    elif args.json:
        print_json(rows)
    else:
        print_table(
            ["STEP", "LOSS", "LR", "GRAD NORM", "TOKENS/S", "VAL LOSS"],
            (
                (r.step, f"{r.loss:.4f}", f"{r.learning_rate:.3g}", f"{r.grad_norm:.3f}",
                 f"{r.tokens_per_second:,.0f}", "" if r.val_loss is None else f"{r.val_loss:.4f}")
                for r in rows
            ),
        )  # fmt: skip
