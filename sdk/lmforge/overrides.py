"""Spec fields from `key=value` text, typed by the proto: `lmforge train --set`, and the
HTTP gateway's OpenAI `hyperparameters`/`metadata`. No I/O."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from lmforge.v1 import common_pb2

SPECS = {
    "model": common_pb2.ModelSpec.DESCRIPTOR,
    "training": common_pb2.TrainingSpec.DESCRIPTOR,
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class OverrideError(ValueError):
    """A `key=value` that names no spec field or whose value does not fit it."""


def _typed(fd: Any, key: str, raw: str) -> Any:
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
        raise OverrideError(f"{key}={raw}: expected {kind}") from None
    if fd.cpp_type == fd.CPPTYPE_BOOL:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise OverrideError(f"{key}={raw}: expected true or false")
    return raw


def parse_overrides(pairs: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """["model.n_layers=4", "max_steps=100"] -> ({"n_layers": 4}, {"max_steps": 100}), each
    value typed by its proto field; a bare name must belong to only one of the two specs."""
    found: dict[str, dict[str, Any]] = {"model": {}, "training": {}}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OverrideError(f"{pair}: expected key=value, e.g. training.max_steps=100")
        section, _, name = key.rpartition(".")
        sections = (
            [section] if section else [s for s, d in SPECS.items() if name in d.fields_by_name]
        )
        if section and section not in SPECS:
            raise OverrideError(f"{key}: the prefix must be model. or training.")
        if not sections or name not in SPECS[sections[0]].fields_by_name:
            known = [f"{s}.{n}" for s, d in SPECS.items() for n in d.fields_by_name]
            close = difflib.get_close_matches(key, known + [k.split(".")[1] for k in known], n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise OverrideError(f"{key}: no such spec field{hint}")
        if len(sections) > 1:
            raise OverrideError(f"{key}: ambiguous; write model.{name} or training.{name}")
        fd = SPECS[sections[0]].fields_by_name[name]
        found[sections[0]][name] = _typed(fd, key, raw.strip())
    return found["model"], found["training"]
