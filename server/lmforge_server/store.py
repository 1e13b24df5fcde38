"""The job store on Redis: datasets, jobs with their event streams, models, idempotency keys
and leases. Knows nothing of gRPC; the API server and the workers share it.

Keys (prefix `lmf:`):
  dataset:<owner>:<sha256>   hash      datasets:<owner>        zset (created_at)
  job:<id>                   hash      jobs:<owner>            zset (created_at)
  job:<id>:events            stream    jobs:active             set of non-terminal job ids
                                       jobs:active:<owner>     the same, per owner
  idem:<owner>:<request_id>  job id    lease:<job id>          "<attempt>:<token>", PX ttl
  model:<id>                 hash      models:<owner>          zset (created_at)
  bytes:<owner>              bytes of the owner's datasets (quota)
  modelname:<owner>:<name>   zset version -> model id          modelver:<owner>:<name> counter
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from lmforge_server import errors
from lmforge_server.labels import matches as labels_match

P = "lmf:"
EVENTS_MAXLEN = 100_000

QUEUED, RUNNING, EXPORTING = "QUEUED", "RUNNING", "EXPORTING"
SUCCEEDED, FAILED, CANCELLING, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLING", "CANCELLED"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# Checkpointed and holding no worker until resumed (lmforge_server.pausing).
PAUSED = "PAUSED"

MODEL_TRAINING, MODEL_READY, MODEL_ABANDONED = "TRAINING", "READY", "ABANDONED"


class NotFound(errors.NotFound, KeyError):
    """No such record for this owner (another owner's records are not found either)."""

    def __str__(self) -> str:
        return self.message


class Conflict(errors.FailedPrecondition):
    """The record is not in a state that allows the change."""


class LeaseLost(RuntimeError):
    """A fenced write by a worker that no longer holds the job's lease."""


@dataclass
class DatasetRecord:
    id: str
    owner: str
    name: str
    sha256: str
    size_bytes: int
    num_chars: int
    num_distinct_chars: int
    created_at: float
    path: str


@dataclass
class JobRecord:
    id: str
    owner: str
    dataset_id: str
    model_name: str
    model_id: str
    state: str
    spec: dict[str, Any]
    parameters: dict[str, int]
    progress: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    attempt: int = 0
    request_id: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    device: str = ""
    checkpoint: str = ""
    cancel_requested: bool = False
    dataset_path: str = ""
    # When the job was last handed to Celery, and when a worker last picked its task up
    # (0: never): a QUEUED job with neither recent is repaired by the reaper.
    enqueued_at: float = 0.0
    picked_at: float = 0.0
    # "<lease token>:<n>": the last numbered progress event the lease holder wrote, so an
    # event sent again after its reply was lost (a Redis outage) is recorded once.
    event_seq: str = ""
    # The client's labels (lmforge_server.labels).
    metadata: dict[str, str] = field(default_factory=dict)
    validation_dataset_id: str = ""
    validation_dataset_path: str = ""
    # "<job id>:<step>": this job exports that checkpoint instead of training.
    export_of: str = ""


@dataclass
class ModelRecord:
    id: str
    owner: str
    name: str
    version: int
    job_id: str
    state: str
    spec: dict[str, Any]
    parameters: dict[str, int]
    path: str
    created_at: float
    metrics: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    dataset_sha256: str = ""


@dataclass
class JobEvent:
    id: str
    job_id: str
    type: str  # STATE, PROGRESS, EVAL, CHECKPOINT, LOG
    time: float
    state: str
    progress: dict[str, Any]
    message: str
    terminal: bool


_JSON_FIELDS = {"spec", "parameters", "progress", "metrics", "files", "metadata"}
_INT_FIELDS = {"size_bytes", "num_chars", "num_distinct_chars", "attempt", "version"}
_FLOAT_FIELDS = {"created_at", "started_at", "finished_at", "enqueued_at", "picked_at"}
_BOOL_FIELDS = {"cancel_requested"}


def _encode(record) -> dict[str, str]:
    out = {}
    for k, v in asdict(record).items():
        if k in _JSON_FIELDS:
            out[k] = json.dumps(v)
        elif k in _BOOL_FIELDS:
            out[k] = "1" if v else "0"
        else:
            out[k] = str(v)
    return out


def _decode(cls, raw: dict[str, str]):
    values: dict[str, Any] = {}
    for k in cls.__dataclass_fields__:
        if k not in raw:
            continue
        v = raw[k]
        if k in _JSON_FIELDS:
            values[k] = json.loads(v)
        elif k in _INT_FIELDS:
            values[k] = int(v)
        elif k in _FLOAT_FIELDS:
            values[k] = float(v)
        elif k in _BOOL_FIELDS:
            values[k] = v == "1"
        else:
            values[k] = v
    return cls(**values)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """ "name@3" -> ("name", 3); "name@latest" and "name" -> ("name", None)."""
    name, _, version = ref.partition("@")
    if not version or version == "latest":
        return name, None
    if not version.isdigit():
        raise ValueError(f"model version must be a number or 'latest', got {errors.shown(version)}")
    return name, int(version)


# Renews a lease only if it is still ours: a lease that expired and was taken by another
# worker must not be extended by the old holder.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Store:
    """All records of all owners; every read takes the caller's owner and hides the rest."""

    def __init__(self, client: redis.Redis, *, retention_s: float = 0.0):
        self.r = client
        # Finished jobs' records and events expire this long after they end (0: never).
        self.retention_s = retention_s
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, *, retention_s: float = 0.0) -> Store:
        return cls(
            redis.Redis.from_url(
                url, decode_responses=True, health_check_interval=30, socket_keepalive=True
            ),
            retention_s=retention_s,
        )

    def _expire_cmd(self, pipe, job_id: str) -> None:
        if self.retention_s > 0:
            ttl = max(1, int(self.retention_s))
            pipe.expire(f"{P}job:{job_id}", ttl)
            pipe.expire(f"{P}job:{job_id}:events", ttl)
            pipe.expire(f"{P}job:{job_id}:checkpoints", ttl)

    # ------------------------------------------------------------ datasets

    def dataset_usage(self, owner: str) -> tuple[int, int]:
        """(datasets, bytes) the owner stores."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(f"{P}datasets:{owner}")
        pipe.get(f"{P}bytes:{owner}")
        count, used = pipe.execute()
        return int(count), int(used or 0)

    def put_dataset(
        self, rec: DatasetRecord, *, max_datasets: int = 0, max_bytes: int = 0
    ) -> DatasetRecord:
        """Registers a dataset; the same content for the same owner returns the first record.

        Raises errors.ResourceExhausted when a new dataset would exceed the owner's quotas
        (0: no limit)."""
        key = f"{P}dataset:{rec.owner}:{rec.id}"
        if self.r.exists(key):
            return self.get_dataset(rec.owner, rec.id)
        count, used = self.dataset_usage(rec.owner)
        if max_datasets and count >= max_datasets:
            raise errors.ResourceExhausted(
                f"datasets: {count} stored; the limit per owner is {max_datasets}"
                " (max_datasets_per_owner)"
            )
        if max_bytes and used + rec.size_bytes > max_bytes:
            raise errors.ResourceExhausted(
                f"size_bytes: {used} bytes stored, {rec.size_bytes} more would exceed the"
                f" limit per owner of {max_bytes} (max_stored_bytes_per_owner)"
            )
        if not self.r.hsetnx(key, "id", rec.id):
            return self.get_dataset(rec.owner, rec.id)
        pipe = self.r.pipeline()
        pipe.hset(key, mapping=_encode(rec))
        pipe.zadd(f"{P}datasets:{rec.owner}", {rec.id: rec.created_at})
        pipe.incrby(f"{P}bytes:{rec.owner}", rec.size_bytes)
        pipe.execute()
        return rec

    def get_dataset(self, owner: str, dataset_id: str) -> DatasetRecord:
        raw = self.r.hgetall(f"{P}dataset:{owner}:{dataset_id}")
        if not raw or "path" not in raw:
            raise NotFound(f"dataset {errors.shown(dataset_id)} not found")
        return _decode(DatasetRecord, raw)

    def list_datasets(self, owner: str, offset: int, limit: int) -> tuple[list, int | None]:
        ids = self.r.zrevrange(f"{P}datasets:{owner}", offset, offset + limit)
        recs = [self.get_dataset(owner, i) for i in ids[:limit]]
        return recs, (offset + limit if len(ids) > limit else None)

    def delete_dataset(self, owner: str, dataset_id: str) -> DatasetRecord:
        rec = self.get_dataset(owner, dataset_id)
        for job_id in self.r.smembers(f"{P}jobs:active:{owner}"):
            if self.r.hget(f"{P}job:{job_id}", "dataset_id") == dataset_id:
                raise Conflict(f"dataset {dataset_id!r} is used by active job {job_id}")
        pipe = self.r.pipeline()
        pipe.delete(f"{P}dataset:{owner}:{dataset_id}")
        pipe.zrem(f"{P}datasets:{owner}", dataset_id)
        pipe.decrby(f"{P}bytes:{owner}", rec.size_bytes)
        pipe.execute()
        return rec

    # ------------------------------------------------------------ jobs

    def create_job(self, job: JobRecord, *, max_active: int) -> tuple[JobRecord, bool]:
        """Stores a new QUEUED job and its TRAINING model version.

        Returns (job, created). With a request_id seen before for this owner, returns the
        job it created and False. Raises Conflict when the owner has max_active jobs.
        """
        if job.request_id:
            idem = f"{P}idem:{job.owner}:{job.request_id}"
            if not self.r.set(idem, job.id, nx=True, ex=7 * 24 * 3600):
                existing = self.r.get(idem)
                for _ in range(50):  # the first request may still be writing its job
                    try:
                        return self.get_job(job.owner, existing), False
                    except NotFound:
                        time.sleep(0.02)
                raise NotFound(
                    f"job {errors.shown(existing)} for request_id {errors.shown(job.request_id)} not found"
                )
        active = self.r.scard(f"{P}jobs:active:{job.owner}")
        if active >= max_active:
            if job.request_id:
                self.r.delete(f"{P}idem:{job.owner}:{job.request_id}")
            raise Conflict(f"{active} active jobs; the limit per owner is {max_active}")
        version = self.r.incr(f"{P}modelver:{job.owner}:{job.model_name}")
        model = ModelRecord(
            id=job.model_id,
            owner=job.owner,
            name=job.model_name,
            version=version,
            job_id=job.id,
            state=MODEL_TRAINING,
            spec=job.spec,
            parameters=job.parameters,
            path="",
            created_at=job.created_at,
        )
        pipe = self.r.pipeline()
        pipe.hset(f"{P}job:{job.id}", mapping=_encode(job))
        pipe.zadd(f"{P}jobs:{job.owner}", {job.id: job.created_at})
        pipe.sadd(f"{P}jobs:active", job.id)
        pipe.sadd(f"{P}jobs:active:{job.owner}", job.id)
        pipe.hset(f"{P}model:{model.id}", mapping=_encode(model))
        pipe.zadd(f"{P}models:{job.owner}", {model.id: model.created_at})
        pipe.zadd(f"{P}modelname:{job.owner}:{job.model_name}", {model.id: version})
        pipe.execute()
        self._event(job.id, "STATE", QUEUED, message="job created")
        return job, True

    def job(self, job_id: str) -> JobRecord:
        """A job of any owner: for workers and the reaper, never for client requests."""
        raw = self.r.hgetall(f"{P}job:{job_id}")
        if not raw:
            raise NotFound(f"job {errors.shown(job_id)} not found")
        return _decode(JobRecord, raw)

    def get_job(self, owner: str, job_id: str) -> JobRecord:
        job = self.job(job_id)
        if job.owner != owner:
            raise NotFound(f"job {errors.shown(job_id)} not found")
        return job

    def _iter_jobs(self, owner: str, batch: int = 500) -> Iterable[JobRecord]:
        """The owner's jobs, newest first, fetched a pipelined batch at a time."""
        ids = self.r.zrevrange(f"{P}jobs:{owner}", 0, -1)
        for start in range(0, len(ids), batch):
            pipe = self.r.pipeline(transaction=False)
            for job_id in ids[start : start + batch]:
                pipe.hgetall(f"{P}job:{job_id}")
            yield from (_decode(JobRecord, raw) for raw in pipe.execute() if raw)

    def list_jobs(
        self,
        owner: str,
        offset: int,
        limit: int,
        state: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> tuple[list[JobRecord], int | None]:
        """Newest first; returns the page and the next offset (None at the end).

        `state` and `labels` (every pair must be among the job's metadata) filter."""
        if state is None and not labels:
            ids = self.r.zrevrange(f"{P}jobs:{owner}", offset, offset + limit)
            pipe = self.r.pipeline(transaction=False)
            for job_id in ids[:limit]:
                pipe.hgetall(f"{P}job:{job_id}")
            raws = pipe.execute()
            expired = [i for i, raw in zip(ids, raws, strict=False) if not raw]
            if expired:  # past the retention: their index entries go too
                self.r.zrem(f"{P}jobs:{owner}", *expired)
            jobs = [_decode(JobRecord, raw) for raw in raws if raw]
            return jobs, (offset + limit if len(ids) > limit else None)
        matching = [
            j
            for j in self._iter_jobs(owner)
            if state in (None, j.state) and labels_match(j.metadata, labels or {})
        ]
        page = matching[offset : offset + limit]
        return page, (offset + limit if len(matching) > offset + limit else None)

    def request_cancel(self, owner: str, job_id: str) -> JobRecord:
        """QUEUED ends CANCELLED at once; RUNNING/EXPORTING become CANCELLING and the
        worker ends them. Cancelling a finished job is a no-op that returns it."""
        key = f"{P}job:{job_id}"
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    job = self.get_job(owner, job_id)
                    if job.state in TERMINAL or job.state == CANCELLING:
                        pipe.unwatch()
                        return job
                    pipe.multi()
                    if job.state in (QUEUED, PAUSED):
                        pipe.hset(key, mapping={"state": CANCELLED, "finished_at": time.time()})
                        pipe.srem(f"{P}jobs:active", job_id)
                        pipe.srem(f"{P}jobs:active:{owner}", job_id)
                        pipe.hset(f"{P}model:{job.model_id}", "state", MODEL_ABANDONED)
                        self._event_cmd(pipe, job_id, "STATE", CANCELLED, "cancelled while queued")
                        self._expire_cmd(pipe, job_id)
                    else:
                        pipe.hset(key, mapping={"state": CANCELLING, "cancel_requested": "1"})
                        self._event_cmd(pipe, job_id, "STATE", CANCELLING, "cancel requested")
                    pipe.execute()
                    return self.job(job_id)
                except redis.WatchError:
                    continue

    # ------------------------------------------------------------ events

    def _event_cmd(
        self,
        pipe,
        job_id: str,
        type_: str,
        state: str,
        message: str = "",
        progress: dict | None = None,
        at: float | None = None,
    ) -> None:
        pipe.xadd(
            f"{P}job:{job_id}:events",
            {
                "type": type_,
                "state": state,
                "time": f"{at or time.time():.6f}",
                "message": message,
                "progress": json.dumps(progress or {}),
                "terminal": "1" if (type_ == "STATE" and state in TERMINAL) else "0",
            },
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )

    def _event(self, job_id, type_, state, message="", progress=None) -> None:
        pipe = self.r.pipeline()
        self._event_cmd(pipe, job_id, type_, state, message, progress)
        pipe.execute()

    def read_events(
        self, job_id: str, after: str, *, block_ms: int = 0, count: int = 500
    ) -> list[JobEvent]:
        """Events after the id `after` ("" = from the start); waits up to block_ms for new ones."""
        key = f"{P}job:{job_id}:events"
        start = after or "0-0"
        if block_ms:
            res = self.r.xread({key: start}, count=count, block=block_ms)
            entries = res[0][1] if res else []
        else:
            entries = self.r.xrange(key, f"({start}" if after else "-", "+", count=count)
        return [
            JobEvent(
                id=eid,
                job_id=job_id,
                type=f["type"],
                time=float(f["time"]),
                state=f["state"],
                progress=json.loads(f.get("progress") or "{}"),
                message=f.get("message", ""),
                terminal=f.get("terminal") == "1",
            )
            for eid, f in entries
        ]

    # ------------------------------------------------------------ leases (workers)

    def acquire(self, job_id: str, token: str, ttl_s: float, device: str) -> JobRecord | None:
        """Takes the job's lease and moves it to RUNNING with the next attempt number.

        Returns None, touching nothing, when the job is terminal or another worker holds
        its lease: a redelivered task then just acks. The attempt number is the fencing
        token: every later write checks the lease still holds it.
        """
        key, lease = f"{P}job:{job_id}", f"{P}lease:{job_id}"
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, lease)
                    if pipe.exists(lease):
                        pipe.unwatch()
                        return None
                    job = self.job(job_id)
                    if job.state in TERMINAL or job.state == PAUSED:
                        pipe.unwatch()
                        return None
                    attempt = job.attempt + 1
                    pipe.multi()
                    if job.state == CANCELLING or job.cancel_requested:
                        self._finish_cmd(pipe, job, CANCELLED, "cancelled before it ran again")
                        pipe.execute()
                        return None
                    pipe.set(lease, f"{attempt}:{token}", px=int(ttl_s * 1000))
                    fields = {"state": RUNNING, "attempt": attempt, "device": device}
                    if not job.started_at:
                        fields["started_at"] = time.time()
                    pipe.hset(key, mapping=fields)
                    resumed = f", resuming from {job.checkpoint}" if job.checkpoint else ""
                    self._event_cmd(
                        pipe, job_id, "STATE", RUNNING, f"attempt {attempt} on {device}{resumed}"
                    )
                    pipe.execute()
                    return self.job(job_id)
                except redis.WatchError:
                    continue

    def renew(self, job_id: str, attempt: int, token: str, ttl_s: float) -> bool:
        return bool(
            self._renew(keys=[f"{P}lease:{job_id}"], args=[f"{attempt}:{token}", int(ttl_s * 1000)])
        )

    def release(self, job_id: str, attempt: int, token: str) -> None:
        self._release(keys=[f"{P}lease:{job_id}"], args=[f"{attempt}:{token}"])

    def fenced(
        self, job_id: str, attempt: int, token: str, write: Callable[[Any, JobRecord], None]
    ) -> JobRecord:
        """Runs `write(pipe, job)` in a transaction only while (attempt, token) holds the lease."""
        key, lease = f"{P}job:{job_id}", f"{P}lease:{job_id}"
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, lease)
                    if pipe.get(lease) != f"{attempt}:{token}":
                        raise LeaseLost(f"job {job_id}: lease of attempt {attempt} was lost")
                    job = self.job(job_id)
                    pipe.multi()
                    write(pipe, job)
                    pipe.execute()
                    return job
                except redis.WatchError:
                    continue

    def record_progress(
        self, job_id, attempt, token, progress: dict, type_="PROGRESS", msg="", at=None, seq=None
    ):
        """`at`: when it happened (events kept through a Redis outage are written later).
        `seq`: the event's number within this lease, counting up; an event whose number
        was already written (its reply was lost, it is sent again) is not written twice."""

        def write(pipe, job):
            if seq is not None:
                last_token, _, last = job.event_seq.rpartition(":")
                if last_token == token and int(last) >= seq:
                    return
                pipe.hset(f"{P}job:{job_id}", "event_seq", f"{token}:{seq}")
            merged = {**job.progress, **progress}
            pipe.hset(f"{P}job:{job_id}", "progress", json.dumps(merged))
            self._event_cmd(pipe, job_id, type_, job.state, msg, merged, at=at)

        self.fenced(job_id, attempt, token, write)

    def promote_checkpoint(self, job_id, attempt, token, path: str, step: int) -> None:
        def write(pipe, job):
            pipe.hset(f"{P}job:{job_id}", "checkpoint", path)
            self._event_cmd(pipe, job_id, "CHECKPOINT", job.state, f"checkpoint at step {step}")

        self.fenced(job_id, attempt, token, write)

    def set_state(self, job_id, attempt, token, state: str, message: str = "") -> None:
        """A non-terminal transition by the lease holder (RUNNING -> EXPORTING)."""

        def write(pipe, job):
            # A cancel that arrived meanwhile wins over the worker's own transition.
            if job.state == CANCELLING:
                return
            pipe.hset(f"{P}job:{job_id}", "state", state)
            self._event_cmd(pipe, job_id, "STATE", state, message)

        self.fenced(job_id, attempt, token, write)

    def _finish_cmd(self, pipe, job: JobRecord, state: str, message: str, model=None) -> None:
        fields: dict[str, Any] = {"state": state, "finished_at": time.time()}
        if state == FAILED:
            fields["error"] = message
        pipe.hset(f"{P}job:{job.id}", mapping=fields)
        pipe.srem(f"{P}jobs:active", job.id)
        pipe.srem(f"{P}jobs:active:{job.owner}", job.id)
        if model is not None:
            pipe.hset(f"{P}model:{model.id}", mapping=_encode(model))
        else:
            pipe.hset(f"{P}model:{job.model_id}", "state", MODEL_ABANDONED)
        self._event_cmd(pipe, job.id, "STATE", state, message, job.progress)
        self._expire_cmd(pipe, job.id)

    def finish(
        self,
        job_id,
        attempt,
        token,
        state: str,
        message: str = "",
        model: ModelRecord | None = None,
    ) -> str:
        """Ends the job (SUCCEEDED registers `model` READY in the same transaction) and
        returns the state written: a cancel accepted (CANCELLING) before this transaction
        wins over SUCCEEDED, so a client told "cancelling" never sees the job succeed."""
        ended = [state]

        def write(pipe, job):
            if state == SUCCEEDED and job.state == CANCELLING:
                ended[0] = CANCELLED
                self._finish_cmd(pipe, job, CANCELLED, "cancelled during export")
            else:
                self._finish_cmd(pipe, job, state, message, model)
            pipe.delete(f"{P}lease:{job_id}")

        self.fenced(job_id, attempt, token, write)
        return ended[0]

    def requeue(self, job_id, attempt, token, message: str) -> None:
        """The holder gives the job back (worker shutdown): QUEUED, lease released."""

        def write(pipe, job):
            pipe.hset(f"{P}job:{job_id}", "state", QUEUED)
            pipe.delete(f"{P}lease:{job_id}")
            self._event_cmd(pipe, job_id, "STATE", QUEUED, message)

        self.fenced(job_id, attempt, token, write)

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(f"{P}job:{job_id}", "cancel_requested") == "1"

    def orphans(self) -> list[str]:
        """Active jobs past QUEUED whose worker's lease has expired (the worker died)."""
        out = []
        for job_id in self.r.smembers(f"{P}jobs:active"):
            state = self.r.hget(f"{P}job:{job_id}", "state")
            if state in (RUNNING, EXPORTING, CANCELLING) and not self.r.exists(
                f"{P}lease:{job_id}"
            ):
                out.append(job_id)
        return out

    def job_counts(self, queue: str) -> tuple[dict[str, int], int]:
        """Active jobs of every owner by state, and the tasks waiting in the Celery queue
        (a Redis list named after the queue): for the metrics, read in one round trip."""
        ids = list(self.r.smembers(f"{P}jobs:active"))
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(f"{P}job:{job_id}", "state")
        pipe.llen(queue)
        *states, queued = pipe.execute()
        counts: dict[str, int] = {}
        for state in filter(None, states):
            counts[state] = counts.get(state, 0) + 1
        return counts, queued

    def recover_orphan(self, job_id: str, max_attempts: int = 0) -> str | None:
        """Requeues (or, when cancel was asked, cancels) a job whose worker died; a job
        whose worker died `max_attempts` times (0: no limit) ends FAILED instead.

        Returns the new state, or None when the job was not an orphan after all.
        """
        key, lease = f"{P}job:{job_id}", f"{P}lease:{job_id}"
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, lease)
                    job = self.job(job_id)
                    if pipe.exists(lease) or job.state not in (RUNNING, EXPORTING, CANCELLING):
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    if job.state == CANCELLING:
                        self._finish_cmd(pipe, job, CANCELLED, "cancelled (its worker was lost)")
                        new_state = CANCELLED
                    elif max_attempts and job.attempt >= max_attempts:
                        step = job.progress.get("step", 0)
                        msg = f"worker lost {job.attempt} times (last seen at step {step})"
                        self._finish_cmd(pipe, job, FAILED, msg)
                        new_state = FAILED
                    else:
                        pipe.hset(key, "state", QUEUED)
                        msg = f"worker of attempt {job.attempt} lost; requeued"
                        self._event_cmd(pipe, job_id, "STATE", QUEUED, msg)
                        new_state = QUEUED
                    pipe.execute()
                    return new_state
                except redis.WatchError:
                    continue

    def mark_enqueued(self, job_id: str) -> None:
        self.r.hset(f"{P}job:{job_id}", "enqueued_at", f"{time.time():.6f}")

    def mark_picked(self, job_id: str) -> None:
        """A worker received the job's task (before it tries to take the lease)."""
        self.r.hset(f"{P}job:{job_id}", "picked_at", f"{time.time():.6f}")

    def stalled_queued(self, grace_s: float) -> list[str]:
        """QUEUED jobs with no task that will run them: never enqueued (the enqueue failed
        after the record was saved), or picked up by a worker that died before taking the
        lease. Each has been so for longer than `grace_s`."""
        now = time.time()
        out = []
        for job_id in self.r.smembers(f"{P}jobs:active"):
            raw = self.r.hmget(
                f"{P}job:{job_id}", ["state", "created_at", "enqueued_at", "picked_at"]
            )
            state, created, enqueued, picked = raw[0], *(float(v or 0) for v in raw[1:])
            if state != QUEUED or self.r.exists(f"{P}lease:{job_id}"):
                continue
            never_sent = not enqueued and now - created > grace_s
            lost_on_pickup = picked and picked >= enqueued and now - picked > grace_s
            if never_sent or lost_on_pickup:
                out.append(job_id)
        return out

    def delete_job(self, owner: str, job_id: str) -> JobRecord:
        """Removes a terminal job, its events and its idempotency key (not its model)."""
        job = self.get_job(owner, job_id)
        if job.state not in TERMINAL:
            raise Conflict(f"job {job_id} is {job.state.lower()}; cancel it and wait until it ends")
        pipe = self.r.pipeline()
        pipe.delete(f"{P}job:{job_id}", f"{P}job:{job_id}:events", f"{P}job:{job_id}:checkpoints")
        pipe.zrem(f"{P}jobs:{owner}", job_id)
        if job.request_id:
            pipe.delete(f"{P}idem:{owner}:{job.request_id}")
        pipe.execute()
        return job

    # ------------------------------------------------------------ models

    def model(self, model_id: str) -> ModelRecord:
        raw = self.r.hgetall(f"{P}model:{model_id}")
        if not raw or "name" not in raw:
            raise NotFound(f"model {errors.shown(model_id)} not found")
        return _decode(ModelRecord, raw)

    def get_model(self, owner: str, ref: str) -> ModelRecord:
        """By id, "name@version", "name@latest" or "name" (latest READY, else latest)."""
        try:
            rec = self.model(ref)
            if rec.owner == owner:
                return rec
        except NotFound:
            pass
        try:
            name, version = parse_model_ref(ref)
        except ValueError as e:
            raise NotFound(str(e)) from None
        versions = self.r.zrevrange(f"{P}modelname:{owner}:{name}", 0, -1, withscores=True)
        if not versions:
            raise NotFound(f"model {errors.shown(ref)} not found")
        if version is not None:
            for model_id, v in versions:
                if int(v) == version:
                    return self.model(model_id)
            raise NotFound(f"model {errors.shown(name)} has no version {version}")
        records = [self.model(mid) for mid, _ in versions]
        ready = [r for r in records if r.state == MODEL_READY]
        return ready[0] if ready else records[0]

    def list_models(
        self, owner: str, offset: int, limit: int, name: str = ""
    ) -> tuple[list[ModelRecord], int | None]:
        if name:
            ids = self.r.zrevrange(f"{P}modelname:{owner}:{name}", offset, offset + limit)
        else:
            ids = self.r.zrevrange(f"{P}models:{owner}", offset, offset + limit)
        recs = [self.model(i) for i in ids[:limit]]
        return recs, (offset + limit if len(ids) > limit else None)

    def delete_model(self, owner: str, ref: str) -> ModelRecord:
        rec = self.get_model(owner, ref)
        if rec.state == MODEL_TRAINING:
            raise Conflict(f"model {rec.id} is still training (job {rec.job_id}); cancel it first")
        pipe = self.r.pipeline()
        pipe.delete(f"{P}model:{rec.id}")
        pipe.zrem(f"{P}models:{owner}", rec.id)
        pipe.zrem(f"{P}modelname:{owner}:{rec.name}", rec.id)
        pipe.execute()
        return rec

    def resolve(self, owner: str, ref: str):
        """The inference server's view of a model (lmforge_server.inference.resolver)."""
        from pathlib import Path

        from lmforge_server.inference.resolver import ResolvedModel

        rec = self.get_model(owner, ref)
        return ResolvedModel(
            model_id=rec.id,
            name=rec.name,
            version=rec.version,
            state=rec.state,
            path=Path(rec.path),
        )
