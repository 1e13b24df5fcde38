"""Runs one training job for a worker: lease, heartbeat, train, export, register.

Celery delivers a task at least once; this module makes that safe. A worker first takes
the job's lease (its attempt number is the fencing token); a redelivered task whose job is
leased by another worker or already ended returns at once. Every write to the job record
is fenced, so a worker that lost its lease cannot overwrite the new holder's progress.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import socket
import threading
from dataclasses import asdict, is_dataclass
from pathlib import Path

import redis

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


class _Heartbeat(threading.Thread):
    """Renews the lease every ttl/3 and watches the job's cancel flag."""

    def __init__(self, store: st.Store, job_id: str, attempt: int, token: str, ttl_s: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.store, self.job_id, self.ttl_s = store, job_id, ttl_s
        self.attempt, self.token = attempt, token
        self.cancel = threading.Event()
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
                if since_renew >= renew_every:
                    since_renew = 0.0
                    if not self.store.renew(self.job_id, self.attempt, self.token, self.ttl_s):
                        log.error("job %s: lease of attempt %s lost", self.job_id, self.attempt)
                        self.lost.set()
                        return
            except Exception as e:  # a Redis blip: keep trying until the lease really expires
                log.warning("job %s: heartbeat failed: %s", self.job_id, e)

    def stop(self) -> None:
        self._stop.set()


class _Hooks:
    """The training loop's view of the job: progress out, stop requests in."""

    def __init__(self, store: st.Store, job: st.JobRecord, token: str, beat: _Heartbeat):
        self.store, self.job, self.token, self.beat = store, job, token, beat

    def should_stop(self) -> str | None:
        if self.beat.cancel.is_set():
            return "cancel"
        if self.beat.lost.is_set() or SHUTDOWN.is_set():
            return "shutdown"
        return None

    def _write(self, progress: dict, type_: str = "PROGRESS", msg: str = "") -> None:
        try:
            self.store.record_progress(
                self.job.id, self.job.attempt, self.token, progress, type_, msg
            )
        except st.LeaseLost:
            self.beat.lost.set()
        except redis.RedisError as e:  # progress is best effort; training goes on
            log.warning("job %s: progress not recorded: %s", self.job.id, e)

    def on_progress(self, p) -> None:
        d = asdict(p) if is_dataclass(p) else dict(p)
        if "lr" in d:
            d["learning_rate"] = d.pop("lr")
        self._write(d)

    def on_eval(self, step, val_loss, val_bpb, best_val_loss, best_step) -> None:
        progress = dict(
            step=step,
            val_loss=val_loss,
            val_bits_per_byte=val_bpb,
            best_val_loss=best_val_loss,
            best_step=best_step,
        )
        msg = f"step {step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte"
        self._write(progress, "EVAL", msg)

    def on_checkpoint(self, step: int, path: Path) -> None:
        try:
            self.store.promote_checkpoint(
                self.job.id, self.job.attempt, self.token, str(path), step
            )
        except st.LeaseLost:
            self.beat.lost.set()
        except redis.RedisError as e:  # the previous checkpoint stays the resume point
            log.warning("job %s: checkpoint at step %s not promoted: %s", self.job.id, step, e)

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
    job = store.acquire(job_id, token, settings.lease_ttl_s, device_name(device))
    if job is None:
        log.info("job %s: leased elsewhere or finished; skipping this delivery", job_id)
        return None
    beat = _Heartbeat(store, job_id, job.attempt, token, settings.lease_ttl_s)
    beat.start()
    hooks = _Hooks(store, job, token, beat)
    try:
        from lmforge_worker import training
        from lmforge_worker.export import export_onnx

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
        with contextlib.suppress(redis.RedisError):
            store.release(job_id, job.attempt, token)


def _train_export_register(
    settings, store, artifacts, job, token, device, hooks, training, export_onnx
) -> str | None:
    spec = JobSpec.from_dict(job.spec)
    work_dir = artifacts.job_dir(job.id)
    checkpoint_dir = work_dir / "checkpoints" / f"attempt-{job.attempt}"
    resume_from = Path(job.checkpoint) if job.checkpoint else None
    init_dir = None
    if spec.training.init_from and resume_from is None:
        init_dir = Path(spec.training.init_from)
    result = training.train(
        spec,
        Path(job.dataset_path),
        work_dir,
        checkpoint_dir,
        hooks,
        device=device,
        resume_from=resume_from,
        init_weights_dir=init_dir,
        torch_threads=settings.torch_threads,
    )
    if result.status == "cancelled":
        store.finish(job.id, job.attempt, token, st.CANCELLED, f"cancelled at step {result.steps}")
        return st.CANCELLED
    if result.status == "interrupted":
        if hooks.beat.lost.is_set():
            return None
        store.requeue(job.id, job.attempt, token, f"worker shut down at step {result.steps}")
        from lmforge_server.taskqueue import enqueue_training, make_celery

        enqueue_training(make_celery(settings), settings, job.id)
        return st.QUEUED

    store.set_state(job.id, job.attempt, token, st.EXPORTING, "exporting to ONNX")
    model_dir = artifacts.model_dir(job.model_id)
    metadata = {
        "job_id": job.id,
        "model_id": job.model_id,
        "owner": job.owner,
        "dataset_sha256": job.dataset_id,
        "stopped": result.status,
    }
    with artifacts.atomic_dir(model_dir) as tmp:
        training.finalize(result, spec, work_dir, tmp, metadata)
        parity = export_onnx(
            tmp,
            fp16=device.startswith("cuda"),
            parity_limit=settings.parity_limit,
            eval_tokens=_val_tokens(work_dir / "data"),
        )
        _merge_metadata(tmp / "metadata.json", {"onnx": parity})
        files = sorted(p.name for p in tmp.iterdir())
    if hooks.should_stop() == "cancel":
        artifacts.remove(model_dir)
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
        path=str(model_dir),
        created_at=prev.created_at,
        metrics={
            "val_loss": result.best_val_loss,
            "val_bits_per_byte": result.best_val_bpb,
            "onnx_parity_max_abs_diff": float(parity.get("max_abs_diff", 0.0)),
            # Per graph variant: validation loss and whether it passed the quality gate.
            **{
                f"onnx_{v['variant']}_{k}": v[k]
                for v in parity.get("variants", [])
                for k in ("val_loss", "passes_quality_gate", "max_abs_logit_diff")
                if v.get(k) is not None
            },
        },
        files=files,
        dataset_sha256=job.dataset_id,
    )
    msg = f"model {model.name}@{model.version} ({model.id}) ready, best val loss {result.best_val_loss:.4f}"
    store.finish(job.id, job.attempt, token, st.SUCCEEDED, msg, model=model)
    return st.SUCCEEDED


def _val_tokens(data_dir: Path, limit: int = 1 << 16):
    """The job's validation tokens (the first `limit`), which score the quantised graphs."""
    import numpy as np

    try:
        meta = json.loads((data_dir / "meta.json").read_text())
        return np.fromfile(data_dir / "val.bin", dtype=meta["dtype"], count=limit)
    except (OSError, ValueError, KeyError):
        return None


def _merge_metadata(path: Path, extra: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(extra)
    path.write_text(json.dumps(data, indent=2))
