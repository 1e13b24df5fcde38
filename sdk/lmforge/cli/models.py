"""`lmforge models list|get|delete|download`."""

from __future__ import annotations

import argparse

from lmforge.cli.context import EXIT_OK, _client
from lmforge.cli.output import _when, human_count, print_fields, print_json, print_table
from lmforge.types import (
    Model,
)


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
        elif args.action == "download":
            paths = client.models.download(args.id, args.dir or args.id.replace("@", "-"))
            if args.json:
                print_json([str(p) for p in paths])
            else:
                print("\n".join(str(p) for p in paths))
        elif args.action == "delete":
            client.models.delete(args.id)
            if args.json:
                print_json({"deleted": args.id})
            else:
                print(f"deleted {args.id}")
    return EXIT_OK
