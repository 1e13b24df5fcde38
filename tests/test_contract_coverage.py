"""Every RPC and every field of the protos has a row in tests/CONTRACT.md naming the tests
that check it by value, and every test a row names exists. A new field without a test, or
a row left behind by a renamed test, fails here."""

from __future__ import annotations

import ast
from pathlib import Path

from lmforge.v1 import common_pb2, inference_pb2, training_pb2

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "tests" / "CONTRACT.md"


def contract_names() -> list[str]:
    """Full names of every RPC and message field the protos declare, nested messages too."""
    names: list[str] = []

    def fields(message) -> None:
        names.extend(f.full_name for f in message.fields)
        for nested in message.nested_types:
            fields(nested)

    for module in (common_pb2, training_pb2, inference_pb2):
        file = module.DESCRIPTOR
        for service in file.services_by_name.values():
            names.extend(m.full_name for m in service.methods)
        for message in file.message_types_by_name.values():
            fields(message)
    return names


def contract_rows(text: str) -> dict[str, list[str]]:
    """`| name | tests/x.py::test_a, tests/y.py::test_b |` rows, by name (header skipped)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if (
            not line.lstrip().startswith("|")
            or len(cells) < 2
            or not cells[0].startswith("lmforge.")
        ):
            continue
        tests = [t.strip() for t in cells[1].split(",") if t.strip()]
        rows.setdefault(cells[0], []).extend(tests)
    return rows


def _defined_tests(path: Path) -> set[str]:
    """`func` and `Class::method` names defined at the top of a test module."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.add(node.name)
        elif isinstance(node, ast.ClassDef):
            out.update(
                f"{node.name}::{n.name}"
                for n in node.body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
    return out


def missing_tests(rows: dict[str, list[str]]) -> list[str]:
    """Row entries whose file or test function does not exist."""
    defined: dict[str, set[str]] = {}
    bad = []
    for name, tests in rows.items():
        for test in tests:
            file, _, func = test.partition("::")
            func = func.split("[", 1)[0]  # a parametrized id names the same function
            path = ROOT / file
            if file not in defined:
                defined[file] = _defined_tests(path) if path.is_file() else set()
            if not func or func not in defined[file]:
                bad.append(f"{name} -> {test}")
    return bad


def test_every_rpc_and_field_has_a_row_naming_existing_tests():
    rows = contract_rows(CONTRACT.read_text())
    names = contract_names()
    without_row = [n for n in names if not rows.get(n)]
    assert not without_row, "no row in tests/CONTRACT.md for:\n" + "\n".join(without_row)
    stale = sorted(set(rows) - set(names))
    assert not stale, "rows in tests/CONTRACT.md for names the protos lack:\n" + "\n".join(stale)
    bad = missing_tests(rows)
    assert not bad, "tests/CONTRACT.md names tests that do not exist:\n" + "\n".join(bad)


def test_the_checker_sees_a_missing_row_and_a_missing_test(tmp_path):
    rows = contract_rows(
        "| name | test |\n|---|---|\n"
        "| lmforge.v1.JobService.CreateJob | tests/test_api.py::test_same_request_id_twice_gives_one_job |\n"
        "| lmforge.v1.Job.id | tests/test_api.py::test_no_such_test, tests/nope.py::test_x |\n"
    )
    assert set(rows) == {"lmforge.v1.JobService.CreateJob", "lmforge.v1.Job.id"}
    assert "lmforge.v1.Progress.learning_rate" in contract_names()
    assert missing_tests(rows) == [
        "lmforge.v1.Job.id -> tests/test_api.py::test_no_such_test",
        "lmforge.v1.Job.id -> tests/nope.py::test_x",
    ]
