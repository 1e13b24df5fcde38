"""Checkpoints as first-class objects: a registry per job in Redis, and which ones to keep.

The worker records every checkpoint it promotes (step, train loss, the latest validation
loss) and keeps the best by validation loss plus the newest `keep_last`; the others' files
are deleted and their entries dropped. `init_from` may name one as "<job id>:<step>".
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from lmforge_server import errors
from lmforge_server import store as st

REF_RE = re.compile(r"^(job_[0-9a-f]+):(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str
    train_loss: float
    # The latest evaluation at or before `step` (0 and val_step 0 before the first).
    val_loss: float
    val_bits_per_byte: float
    val_step: int
    created_at: float


def _key(job_id: str) -> str:
    return f"{st.P}job:{job_id}:checkpoints"


def record(store: st.Store, job_id: str, attempt: int, token: str, ckpt: Checkpoint) -> None:
    """Adds the lease holder's checkpoint to the job's registry."""

    def write(pipe, job):
        pipe.hset(_key(job_id), str(ckpt.step), json.dumps(asdict(ckpt)))

    store.fenced(job_id, attempt, token, write)


def all_of(store: st.Store, job_id: str) -> list[Checkpoint]:
    raw = store.r.hgetall(_key(job_id))
    return sorted((Checkpoint(**json.loads(v)) for v in raw.values()), key=lambda c: c.step)


def list_checkpoints(store: st.Store, owner: str, job_id: str) -> list[Checkpoint]:
    """The owner's job's kept checkpoints by step; NotFound for another owner's job."""
    store.get_job(owner, job_id)
    return all_of(store, job_id)


def to_drop(ckpts: list[Checkpoint], keep_last: int) -> list[Checkpoint]:
    """Everything but the newest `keep_last` and the best by validation loss."""
    keep = {c.step for c in ckpts[-max(1, keep_last) :]}
    evaluated = [c for c in ckpts if c.val_step > 0]
    if evaluated:
        keep.add(min(evaluated, key=lambda c: (c.val_loss, -c.step)).step)
    return [c for c in ckpts if c.step not in keep]


def drop(store: st.Store, job_id: str, attempt: int, token: str, steps: list[int]) -> None:
    def write(pipe, job):
        pipe.hdel(_key(job_id), *map(str, steps))

    if steps:
        store.fenced(job_id, attempt, token, write)


def resolve(store: st.Store, owner: str, ref: str) -> tuple[st.JobRecord, Checkpoint]:
    """The job and checkpoint a "<job id>:<step>" reference names, or NotFound."""
    m = REF_RE.match(ref)
    if not m:
        raise st.NotFound(f"{errors.shown(ref)} is not a checkpoint reference '<job id>:<step>'")
    job = store.get_job(owner, m[1])
    raw = store.r.hget(_key(job.id), str(int(m[2])))
    if raw is None:
        raise st.NotFound(f"job {job.id} has no kept checkpoint at step {int(m[2])}")
    return job, Checkpoint(**json.loads(raw))
