"""Runs one training job for a worker: lease, heartbeat, train, export, register.

Celery delivers a task at least once; this module makes that safe. A worker first takes
the job's lease (its attempt number is the fencing token); a redelivered task whose job is
leased by another worker or already ended returns at once. Every write to the job record
is fenced, so a worker that lost its lease cannot overwrite the new holder's progress.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import secrets
import shutil
import socket
import threading
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import redis

from lmforge_server import checkpoints, metrics, pausing, validation
from lmforge_server import store as st
from lmforge_server.artifacts import ArtifactStore
from lmforge_server.settings import Settings
from lmforge_server.specs import JobSpec

log = logging.getLogger("lmforge.worker")

# Set by the worker's shutdown signal: the loop checkpoints and gives the job back.
SHUTDOWN = threading.Event()


def pick_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return "cpu"


def device_class(device: str) -> str:
    """ "cpu", or the GPU's name: what throughput is measured and estimated per."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


class _Heartbeat(threading.Thread):
    """Renews the lease every ttl/3 and watches the job's cancel and pause flags."""

    def __init__(self, store: st.Store, job_id: str, attempt: int, token: str, ttl_s: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.store, self.job_id, self.ttl_s = store, job_id, ttl_s
        self.attempt, self.token = attempt, token
        self.cancel = threading.Event()
        self.pause = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()

    def run(self) -> None:
        renew_every = self.ttl_s / 3
        since_renew = 0.0
        poll = min(0.25, renew_every)
        while not self._stop.wait(poll):
            since_renew += poll
            try:
                if self.store.cancel_requested(self.job_id):
                    self.cancel.set()
                if pausing.pause_requested(self.store, self.job_id):
                    self.pause.set()
                if since_renew >= renew_every:
                    since_renew = 0.0
                    renewed = self.store.renew(self.job_id, self.attempt, self.token, self.ttl_s)
                    metrics.LEASE_RENEWALS.labels("renewed" if renewed else "lost").inc()
                    if not renewed:
                        log.error("job %s: lease of attempt %s lost", self.job_id, self.attempt)
                        self.lost.set()
                        return
            except Exception as e:  # a Redis blip: keep trying until the lease really expires
                log.warning("job %s: heartbeat failed: %s", self.job_id, e)

    def stop(self) -> None:
        self._stop.set()


# Progress events kept while Redis is unreachable (about an hour of one event a second).
MAX_PENDING_EVENTS = 4096


class _Hooks:
    """The training loop's view of the job: progress out, stop requests in.

    Progress events that cannot be written while Redis is down are kept, in order and with
    their own timestamps, and written once it is back (the oldest are dropped past
    MAX_PENDING_EVENTS).
    """

    def __init__(
        self,
        store: st.Store,
        job: st.JobRecord,
        token: str,
        beat: _Heartbeat,
        artifacts: ArtifactStore,
        peak_flops=0.0,
    ):
        self.store, self.job, self.token, self.beat = store, job, token, beat
        self.artifacts = artifacts
        # The attempt's data directory (tokenizer), published with each checkpoint.
        self.data_dir: Path | None = None
        model, training = job.spec.get("model", {}), job.spec.get("training", {})
        self._tokens_per_step = (
            training.get("batch_size", 0)
            * training.get("grad_accum_steps", 1)
            * model.get("context_length", 0)
        )
        self._peak_flops = peak_flops
        self.pending: collections.deque = collections.deque(maxlen=MAX_PENDING_EVENTS)
        self._seq = itertools.count()  # numbers the events: a resent one is written once
        # Seconds per phase outside the training loop (imports), reported with its own.
        self.timings: dict[str, float] = {}
        self.keep_checkpoints = 3
        self.events = None  # TensorBoard event files, when the operator turned them on
        self.train_loss = 0.0
        self.last_eval = (0.0, 0.0, 0)  # val loss, val bits per byte, step

    def should_stop(self) -> str | None:
        if self.beat.cancel.is_set():
            return "cancel"
        if self.beat.pause.is_set():
            return "pause"
        if self.beat.lost.is_set() or SHUTDOWN.is_set():
            return "shutdown"
        return None

    def _refused(self, what: str) -> None:
        """A fenced write was refused: a newer attempt holds the lease; stop training."""
        # Logged so an operator (and the fencing test) sees why the attempt gave up.
        log.warning(
            "job %s: %s of attempt %s refused: lease lost", self.job.id, what, self.job.attempt
        )
        self.beat.lost.set()

    def _write(self, progress: dict, type_: str = "PROGRESS", msg: str = "") -> None:
        self.pending.append((progress, type_, msg, time.time(), next(self._seq)))
        self.flush()

    def flush(self) -> bool:
        """Writes the kept events in order; False while Redis is still unreachable."""
        try:
            while self.pending:
                progress, type_, msg, at, seq = self.pending[0]
                self.store.record_progress(
                    self.job.id, self.job.attempt, self.token, progress, type_, msg, at, seq
                )
                self.pending.popleft()
        except st.LeaseLost:
            self._refused("progress")
            self.pending.clear()
        except redis.RedisError as e:  # training goes on; the events wait for Redis
            if len(self.pending) == 1:
                log.warning("job %s: Redis unreachable (%s); keeping progress", self.job.id, e)
            return False
        return True

    def drain(self, within_s: float) -> None:
        """Writes the kept events, waiting up to `within_s` for Redis to come back."""
        deadline = time.monotonic() + within_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(0.5)

    def on_progress(self, p) -> None:
        d = asdict(p) if is_dataclass(p) else dict(p)
        self.train_loss = d.get("loss", self.train_loss)
        if "lr" in d:
            d["learning_rate"] = d.pop("lr")
        self._write(d)
        if self.events is not None:
            self.events.progress(d)
        metrics.observe_training(
            self.job.id,
            step=d.get("step", 0),
            tokens_per_second=d.get("tokens_per_second", 0.0),
            tokens_per_step=self._tokens_per_step,
            flops_per_token=self.job.parameters.get("flops_per_token", 0),
            peak_flops=self._peak_flops,
        )

    def open_event_log(self, log_dir: Path) -> None:
        """TensorBoard event files from now on (Settings.tensorboard)."""
        from lmforge_worker.tensorboard_events import EventLog

        self.events = EventLog(log_dir)

    def on_eval(self, step, val_loss, val_bpb, best_val_loss, best_step) -> None:
        if self.events is not None:
            self.events.evaluation(step, val_loss, val_bpb)
        progress = dict(
            step=step,
            val_loss=val_loss,
            val_bits_per_byte=val_bpb,
            best_val_loss=best_val_loss,
            best_step=best_step,
        )
        msg = f"step {step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte"
        self.last_eval = (val_loss, val_bpb, step)
        self._write(progress, "EVAL", msg)

    def on_checkpoint(self, step: int, path: Path) -> None:
        # Into the artifact store first: a resumed attempt may run on another machine.
        try:
            key = self.artifacts.put_checkpoint(
                self.job.id, self.job.attempt, step, path, self.data_dir
            )
        except Exception as e:  # the store is unreachable: the previous checkpoint stays
            log.warning("job %s: checkpoint at step %s not uploaded: %s", self.job.id, step, e)
            return
        try:
            self.store.promote_checkpoint(self.job.id, self.job.attempt, self.token, key, step)
        except st.LeaseLost:
            self._refused(f"checkpoint at step {step}")
            return
        except redis.RedisError as e:  # the previous checkpoint stays the resume point
            log.warning("job %s: checkpoint at step %s not promoted: %s", self.job.id, step, e)
            return
        # Only a promoted checkpoint is a resume point: until one is, the last promoted one
        # must stay (a Redis outage or a lost lease leaves the job pointing at it). Past
        # that, the registry keeps the best and the newest settings.keep_checkpoints. The
        # local files are only staging for the upload.
        for old in path.parent.glob("step-*.pt"):
            if old.name < path.name:
                old.unlink(missing_ok=True)
        try:
            self._keep(step, key)
        except st.LeaseLost:
            self._refused(f"checkpoint at step {step}")
        except redis.RedisError as e:
            log.warning("job %s: checkpoint at step %s not registered: %s", self.job.id, step, e)

    def _keep(self, step: int, key: str) -> None:
        """Registers the checkpoint, then deletes those past retention (best + newest N)."""
        val_loss, val_bpb, val_step = self.last_eval
        ckpt = checkpoints.Checkpoint(
            step, key, self.train_loss, val_loss, val_bpb, val_step, time.time()
        )
        job, token = self.job, self.token
        checkpoints.record(self.store, job.id, job.attempt, token, ckpt)
        kept = checkpoints.all_of(self.store, job.id)
        stale = checkpoints.to_drop(kept, self.keep_checkpoints)
        checkpoints.drop(self.store, job.id, job.attempt, token, [c.step for c in stale])
        # And checkpoints behind this one that never made the registry (their promotion
        # failed) are no resume point any more.
        gone = [c.path for c in stale if c.path != key]
        try:
            for ref in gone:
                self.artifacts.remove(ref)
            self.artifacts.remove_checkpoints_before(key, keep={c.path for c in kept})
        except Exception as e:  # orphans in the store, not a failed job
            log.warning("job %s: old checkpoints not removed: %s", job.id, e)

    def on_log(self, message: str) -> None:
        self._write({}, "LOG", message)


def run_job(
    settings: Settings, store: st.Store, artifacts: ArtifactStore, job_id: str
) -> str | None:
    """Trains, exports and registers one job if this worker can take its lease.

    Returns the job's state when this call ended it (or gave it back as QUEUED), or None when
    the job was not ours to run (leased elsewhere, already ended).
    """
    token = f"{socket.gethostname()}-{secrets.token_hex(4)}"
    device = pick_device(settings.device)
    with contextlib.suppress(redis.RedisError):
        store.mark_picked(job_id)  # lets the reaper repair a pick-up that dies right here
    where = device_name(device)
    if settings.worker_devices > 1:
        where = f"{settings.worker_devices} x {where}"
    job = store.acquire(job_id, token, settings.lease_ttl_s, where)
    if job is None:
        log.info("job %s: leased elsewhere or finished; skipping this delivery", job_id)
        return None
    beat = _Heartbeat(store, job_id, job.attempt, token, settings.lease_ttl_s)
    beat.start()
    hooks = _Hooks(store, job, token, beat, artifacts, settings.training_peak_flops)
    hooks.keep_checkpoints = settings.keep_checkpoints
    try:
        t_import = time.monotonic()
        from lmforge_worker import training
        from lmforge_worker.export import export_onnx

        hooks.timings = {"imports": time.monotonic() - t_import}
        return _train_export_register(
            settings, store, artifacts, job, token, device, hooks, training, export_onnx
        )
    except st.LeaseLost:
        log.warning("job %s: lease lost; another worker owns it now", job_id)
        return None
    except redis.RedisError as e:
        # Not the job's fault: leave it RUNNING; once the lease lapses the API server's
        # reaper requeues it and a worker resumes it from its last promoted checkpoint.
        log.error("job %s: Redis failed (%s); the job will be requeued", job_id, e)
        return None
    except Exception as e:
        log.exception("job %s failed", job_id)
        try:
            store.finish(job_id, job.attempt, token, st.FAILED, f"{type(e).__name__}: {e}")
        except st.LeaseLost:
            return None
        return st.FAILED
    finally:
        beat.stop()
        if hooks.events is not None:
            hooks.events.close()
        metrics.forget_job(job_id)
        with contextlib.suppress(redis.RedisError):
            store.release(job_id, job.attempt, token)
        if not settings.keep_scratch:
            _remove_attempt_scratch(artifacts, job)


def _attempt_dirs(artifacts: ArtifactStore, job: st.JobRecord) -> tuple[Path, Path]:
    """This attempt's local work directory and its checkpoint directory (scratch)."""
    job_scratch = artifacts.scratch_dir / "jobs" / job.id
    attempt = f"attempt-{job.attempt}"
    return job_scratch / attempt, job_scratch / "checkpoints" / attempt


def _remove_attempt_scratch(artifacts: ArtifactStore, job: st.JobRecord) -> None:
    """Deletes this attempt's local work directory once it has ended, however it ended:
    what a later attempt or a reader needs is in the artifact store, and a fleet worker's
    disk would otherwise fill with every job's data and checkpoints. TensorBoard files stay."""
    for path in _attempt_dirs(artifacts, job):
        shutil.rmtree(path, ignore_errors=True)


def _train_export_register(
    settings, store, artifacts, job, token, device, hooks, training, export_onnx
) -> str | None:
    if job.export_of:
        return _export_checkpoint(
            settings, store, artifacts, job, token, device, hooks, training, export_onnx
        )
    spec = JobSpec.from_dict(job.spec)
    # Each attempt has its own local work directory (data, best weights, checkpoints before
    # they are uploaded): a zombie attempt that lost its lease never writes into the files
    # of the attempt that holds it. What outlives the attempt goes to the artifact store.
    work_dir, checkpoint_dir = _attempt_dirs(artifacts, job)
    hooks.data_dir = work_dir / "data"  # its tokenizer goes with every checkpoint
    resume_from = artifacts.checkpoint_file(job.checkpoint) if job.checkpoint else None
    init_dir = None
    if settings.tensorboard:
        hooks.open_event_log(work_dir.parent / "tensorboard" / work_dir.name)
    # Also on a resume: the tokenizer comes from there if the data was never built (the
    # weights come from the checkpoint: train loads init weights only when not resuming).
    if checkpoints.REF_RE.match(spec.training.init_from):
        _, ckpt = checkpoints.resolve(store, job.owner, spec.training.init_from)
        ckpt_file = artifacts.checkpoint_file(ckpt.path)
        init_dir = training.checkpoint_model_dir(
            ckpt_file, work_dir / "init", data_dir=_checkpoint_data(ckpt_file)
        )
    elif spec.training.init_from:
        init_dir = artifacts.local_dir(spec.training.init_from)
    # More than one device: the same loop on every rank under torchrun (this task stays the
    # lease holder and relays the hooks).
    run = training.train
    if spec.training.devices * spec.training.nodes > 1:
        from lmforge_worker.distributed import launch as run
    result = run(
        spec,
        artifacts.dataset_file(job.dataset_path),
        work_dir,
        checkpoint_dir,
        hooks,
        device=device,
        resume_from=resume_from,
        init_weights_dir=init_dir,
        torch_threads=settings.torch_threads,
        val_corpus_path=(
            artifacts.dataset_file(job.validation_dataset_path)
            if job.validation_dataset_path
            else None
        ),
    )
    # Progress kept during a Redis outage comes before the end; a short outage is waited
    # out here rather than giving the job back.
    hooks.drain(settings.lease_ttl_s / 2)
    if result.status == "cancelled":
        store.finish(job.id, job.attempt, token, st.CANCELLED, f"cancelled at step {result.steps}")
        return st.CANCELLED
    if result.status == "paused":
        pausing.mark_paused(store, job.id, job.attempt, token, result.steps)
        return st.PAUSED
    if result.status == "interrupted":
        if hooks.beat.lost.is_set():
            return None
        store.requeue(job.id, job.attempt, token, f"worker shut down at step {result.steps}")
        from lmforge_server.jobs import enqueue
        from lmforge_server.taskqueue import make_celery

        enqueue(make_celery(settings), settings, store, job.id)
        return st.QUEUED

    # Per device: a DDP job's tokens/s is that of all its ranks.
    ranks = spec.training.devices * spec.training.nodes
    flops = result.tokens_per_second * job.parameters.get("flops_per_token", 0) / ranks
    with contextlib.suppress(redis.RedisError):  # an estimate for validate_only; best effort
        validation.record_throughput(store, device_class(device), flops)
    metadata = {
        "job_id": job.id,
        "model_id": job.model_id,
        "owner": job.owner,
        "dataset_sha256": job.dataset_id,
        "stopped": result.status,
    }
    return _export_register(
        settings, store, artifacts, job, token, device, hooks, export_onnx,
        write_files=lambda tmp: training.finalize(result, spec, work_dir, tmp, metadata),
        data_dir=work_dir / "data",
        val_metrics=(result.best_val_loss, result.best_val_bpb),
        timings=result.timings,
    )  # fmt: skip


def _export_checkpoint(
    settings, store, artifacts, job, token, device, hooks, training, export_onnx
) -> str:
    """An ExportCheckpoint job: the kept checkpoint `job.export_of` exported and registered
    like a training job's best weights."""
    try:
        _, ckpt = checkpoints.resolve(store, job.owner, job.export_of)
    except st.NotFound as e:
        raise ValueError(f"checkpoint {job.export_of}: {e.message}") from None
    try:
        path = artifacts.checkpoint_file(ckpt.path)
    except FileNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ValueError(f"checkpoint {job.export_of} was deleted before it could be exported")
    data_dir = _checkpoint_data(path)
    metadata = {
        "job_id": job.id,
        "model_id": job.model_id,
        "owner": job.owner,
        "dataset_sha256": job.dataset_id,
        "exported_checkpoint": job.export_of,
        "checkpoint": {
            "step": ckpt.step,
            "train_loss": ckpt.train_loss,
            "val_loss": ckpt.val_loss,
            "val_step": ckpt.val_step,
        },
    }
    # A checkpoint's val loss is its own only when it was evaluated at that very step.
    evaluated = ckpt.val_step == ckpt.step
    return _export_register(
        settings, store, artifacts, job, token, device, hooks, export_onnx,
        write_files=lambda tmp: training.checkpoint_model_dir(path, tmp, metadata, data_dir),
        data_dir=data_dir or path.parents[2] / path.parent.name / "data",
        val_metrics=(ckpt.val_loss, ckpt.val_bits_per_byte) if evaluated else (0.0, 0.0),
        timings={},
    )  # fmt: skip


def _export_register(
    settings, store, artifacts, job, token, device, hooks, export_onnx, *,
    write_files, data_dir: Path, val_metrics: tuple[float, float], timings: dict,
) -> str:  # fmt: skip
    """Export (fenced by the lease), parity gate, registration: for trained weights and
    for an exported checkpoint alike. `write_files(tmp)` writes the Hugging Face files."""
    store.set_state(job.id, job.attempt, token, st.EXPORTING, "exporting to ONNX")
    best_val_loss, best_val_bpb = val_metrics
    t_export = time.monotonic()
    tmp = _attempt_dirs(artifacts, job)[0] / "export"
    shutil.rmtree(tmp, ignore_errors=True)  # an export of this attempt cut short earlier
    tmp.mkdir(parents=True)
    try:
        write_files(tmp)
        parity = export_onnx(
            tmp,
            fp16=device.startswith("cuda"),
            parity_limit=settings.parity_limit,
            eval_tokens=_val_tokens(data_dir),
            exporter=_exporter(settings.onnx_exporter),
        )
        timings = {**hooks.timings, **timings, "export": time.monotonic() - t_export}
        _merge_metadata(tmp / "metadata.json", {"onnx": parity, "timings": timings})
        files = sorted(p.name for p in tmp.iterdir())
        # Every attempt publishes under a key of its own: a zombie never replaces the files
        # of the attempt that registers them.
        published = artifacts.put_model(job.model_id, job.attempt, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    hooks.on_log("timings: " + " ".join(f"{k}={v:.2f}" for k, v in timings.items()))
    if hooks.should_stop() == "cancel":
        artifacts.remove(published)
        store.finish(job.id, job.attempt, token, st.CANCELLED, "cancelled during export")
        return st.CANCELLED
    prev = store.model(job.model_id)
    model = st.ModelRecord(
        id=job.model_id,
        owner=job.owner,
        name=job.model_name,
        version=prev.version,
        job_id=job.id,
        state=st.MODEL_READY,
        spec=job.spec,
        parameters=job.parameters,
        path=published,
        created_at=prev.created_at,
        metrics={
            "val_loss": best_val_loss,
            "val_bits_per_byte": best_val_bpb,
            "onnx_parity_max_abs_diff": float(parity.get("max_abs_diff", 0.0)),
            # Per graph variant, and the prefill graph ("onnx_prefill_*"): validation loss and
            # whether it passed the quality gate.
            **{
                f"onnx_{v['variant']}_{k}": v[k]
                for v in [*parity.get("variants", []), *filter(None, [parity.get("prefill")])]
                for k in ("val_loss", "passes_quality_gate", "max_abs_logit_diff")
                if v.get(k) is not None
            },
        },
        files=files,
        dataset_sha256=job.dataset_id,
    )
    msg = (
        f"model {model.name}@{model.version} ({model.id}) ready, best val loss {best_val_loss:.4f}"
    )
    try:
        # Fenced: only the lease holder registers its export.
        ended = store.finish(job.id, job.attempt, token, st.SUCCEEDED, msg, model=model)
    except st.LeaseLost:
        artifacts.remove(published)
        raise
    if ended == st.CANCELLED:  # the cancel came after the last look above
        artifacts.remove(published)
        return st.CANCELLED
    artifacts.remove_other_exports(job.model_id, keep=published)
    return st.SUCCEEDED


def _checkpoint_data(ckpt_file: Path) -> Path | None:
    """The tokenizer directory published with a checkpoint (None for one written before
    checkpoints carried it: its attempt's work directory is then beside it)."""
    data_dir = ckpt_file.parent / "data"
    return data_dir if data_dir.is_dir() else None


def _val_tokens(data_dir: Path, limit: int = 1 << 16):
    """The job's validation tokens (the first `limit`), which score the quantised graphs."""
    import numpy as np

    try:
        meta = json.loads((data_dir / "meta.json").read_text())
        return np.fromfile(data_dir / "val.bin", dtype=meta["dtype"], count=limit)
    except (OSError, ValueError, KeyError):
        return None


def _exporter(setting: str) -> str:
    return "gqa" if setting == "auto" else setting


def _merge_metadata(path: Path, extra: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(extra)
    path.write_text(json.dumps(data, indent=2))
