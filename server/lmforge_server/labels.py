"""Job labels (`metadata`): free key/value pairs a client attaches and filters on."""

from __future__ import annotations

import re

from lmforge_server import errors

MAX_PAIRS = 16
MAX_VALUE_CHARS = 512
KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class LabelError(errors.InvalidArgument):
    """A label is out of bounds; the message names the field and the limit."""


def check_labels(labels: dict[str, str], field: str = "metadata") -> dict[str, str]:
    """Returns the labels as a plain dict, or raises LabelError."""
    if len(labels) > MAX_PAIRS:
        raise LabelError(f"{field}: at most {MAX_PAIRS} pairs, got {len(labels)}")
    for key, value in labels.items():
        if not KEY_RE.match(key):
            raise LabelError(
                f"{field}: key {key[:80]!r} must be 1-64 characters of letters, digits, "
                "'.', '_' or '-'"
            )
        if len(value) > MAX_VALUE_CHARS:
            raise LabelError(
                f"{field}[{key}]: at most {MAX_VALUE_CHARS} characters, got {len(value)}"
            )
    return dict(labels)


def matches(labels: dict[str, str], wanted: dict[str, str]) -> bool:
    """True when `labels` holds every pair of `wanted`."""
    return all(labels.get(k) == v for k, v in wanted.items())
