"""How results are printed: JSON for scripts, tables and fields for people."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import Enum
from typing import Any

from lmforge.types import (
    Job,
    Model,
)


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
