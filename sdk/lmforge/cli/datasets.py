"""`lmforge datasets list|upload|get|delete`."""

from __future__ import annotations

import argparse

from lmforge.cli.context import EXIT_OK, _client
from lmforge.cli.output import _when, human_bytes, print_fields, print_json, print_table
from lmforge.types import (
    Dataset,
)


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
