"""A job's metrics, one row per logged step, read back from its event stream.

The worker logs a PROGRESS event every `log_interval` steps and an EVAL event at every
evaluation; the rows are those events, keyed by step. A step replayed after a worker was
lost (it resumed from an earlier checkpoint) keeps the values of the latest attempt.
"""

from __future__ import annotations

from typing import Any

from lmforge_server import store as st

# Columns of a row, in CSV order; the val columns are None where the step was not evaluated.
COLUMNS = (
    "step",
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "val_loss",
    "val_bits_per_byte",
    "elapsed_seconds",
    "tokens_seen",
)
_PROGRESS_COLUMNS = (
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "elapsed_seconds",
    "tokens_seen",
)


def rows_from_events(events) -> list[dict[str, Any]]:
    """Metric rows, ordered by step, from a job's events (store.JobEvent)."""
    rows: dict[int, dict[str, Any]] = {}

    def row(step: int) -> dict[str, Any]:
        return rows.setdefault(step, dict.fromkeys(COLUMNS) | {"step": step})

    for ev in events:
        p = ev.progress
        if ev.type == "PROGRESS" and p.get("step"):
            # Event progress is the job's merged snapshot: take only what this step logged.
            row(p["step"]).update({k: p.get(k) for k in _PROGRESS_COLUMNS})
        elif ev.type == "EVAL" and p.get("step"):
            row(p["step"]).update(
                val_loss=p.get("val_loss"), val_bits_per_byte=p.get("val_bits_per_byte")
            )
    return [rows[s] for s in sorted(rows)]


def job_metrics(store: st.Store, owner: str, job_id: str) -> list[dict[str, Any]]:
    """The owner's job's metric rows so far; NotFound for another owner's job."""
    store.get_job(owner, job_id)
    events, after = [], ""
    while True:
        page = store.read_events(job_id, after, count=1000)
        if not page:
            return rows_from_events(events)
        events.extend(page)
        after = page[-1].id
