"""`lmforge train`: upload a file and start a job on it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge import errors
from lmforge._progress import format_duration
from lmforge.cli.context import (
    EXIT_ERROR,
    EXIT_OK,
    UsageError,
    _bar_wanted,
    _client,
    parse_overrides,
)
from lmforge.cli.output import describe_parameters, human_bytes, print_fields, print_json
from lmforge.types import (
    Job,
    JobState,
)


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
        val_set = None
        if args.validation_dataset:
            val_path = Path(args.validation_dataset)
            val_set = (
                client.datasets.upload(val_path) if val_path.is_file() else args.validation_dataset
            )
        if args.validate_only:
            report = client.jobs.validate(
                dataset=dataset,
                preset=args.preset or "",
                model=model,
                training=training,
                validation_dataset=val_set,
            )
            if args.json:
                print_json(report)
            else:
                print_fields(report)
            return EXIT_ERROR if report.problems else EXIT_OK
        job = client.jobs.create(
            dataset=dataset,
            preset=args.preset or "",
            model=model,
            training=training,
            model_name=args.name or "",
            request_id=args.request_id,
            validation_dataset=val_set,
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
