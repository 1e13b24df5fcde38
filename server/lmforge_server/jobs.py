"""Creating jobs and keeping each one with a task that will run it.

`create` validates a CreateJob request (as plain values), resolves its spec, stores the
job and enqueues it; a retry with the same request_id returns the job and re-enqueues it
when its first enqueue never happened. `enqueue` records every hand-off to Celery, so the
reaper (lmforge_server.reaper) can repair a job that was saved but never sent, or whose
task died with its worker before the lease was taken. The lease absorbs duplicates.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge_server import basemodels, checkpoints, errors, specs, validation
from lmforge_server import store as st
from lmforge_server.artifacts import ArtifactStore
from lmforge_server.labels import check_labels
from lmforge_server.settings import Settings
from lmforge_server.taskqueue import enqueue_training

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_REQUEST_ID = 128
MAX_ID = 128


@dataclass
class CreateRequest:
    dataset_id: str
    preset: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    request_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    validation_dataset_id: str = ""


def check_id(field_name: str, value: str) -> str:
    if not value:
        raise errors.InvalidArgument(f"{field_name}: required")
    if len(value) > MAX_ID:
        raise errors.InvalidArgument(f"{field_name}: at most {MAX_ID} characters")
    return value


def check_name(field_name: str, value: str) -> str:
    if value and not NAME_RE.match(value):
        raise errors.InvalidArgument(
            f"{field_name}: 1-64 characters of letters, digits, '.', '_' or '-'"
        )
    return value


def enqueue(celery, settings: Settings, store: st.Store, job_id: str) -> None:
    devices = store.job(job_id).spec.get("training", {}).get("devices", 1)
    enqueue_training(celery, settings, job_id, devices)
    store.mark_enqueued(job_id)


def _checked(settings: Settings, store: st.Store, owner: str, req: CreateRequest):
    """The request's dataset, resolved spec and labels, after every check CreateJob makes."""
    if len(req.request_id) > MAX_REQUEST_ID:
        raise errors.InvalidArgument(f"request_id: at most {MAX_REQUEST_ID} characters")
    check_name("model_name", req.model_name)
    dataset = _dataset(store, owner, "dataset_id", req.dataset_id)
    val_set = None
    if req.validation_dataset_id:
        val_set = _dataset(store, owner, "validation_dataset_id", req.validation_dataset_id)
    spec = _resolve_spec(settings, store, owner, req, dataset)
    labels = check_labels(req.metadata, "metadata")
    return dataset, val_set, spec, labels


def _dataset(store: st.Store, owner: str, field_name: str, dataset_id: str) -> st.DatasetRecord:
    check_id(field_name, dataset_id)
    try:
        return store.get_dataset(owner, dataset_id)
    except st.NotFound:
        raise errors.NotFound(
            f"{field_name}: dataset {errors.shown(dataset_id)} not found"
        ) from None


def validate(
    settings: Settings, store: st.Store, owner: str, req: CreateRequest
) -> tuple[specs.JobSpec, validation.Report]:
    """CreateJob with validate_only: the same checks, then a report; nothing is stored."""
    dataset, val_set, spec, _ = _checked(settings, store, owner, req)
    report = validation.report(
        spec, dataset, validation.throughputs(store), val_set, settings.fallback_training_flops
    )
    if spec.training.init_from:
        # Read through this server's view of the artifact store (its cache, when remote).
        artifacts = ArtifactStore.from_settings(settings)
        try:
            tokenizer = _init_tokenizer(artifacts, store, owner, spec.training.init_from)
            corpora = [artifacts.dataset_file(d.path) for d in (dataset, val_set) if d]
            validation.add_lost_characters(report, tokenizer, corpora)
        except Exception as e:  # tokenizers raises its own Exception type
            # The tokenizer file is the worker's or the operator's, not the client's.
            report.problems.append(f"init_from's tokenizer could not be read ({type(e).__name__})")
    return spec, report


def _init_tokenizer(artifacts: ArtifactStore, store: st.Store, owner: str, init_from: str) -> Path:
    """The tokenizer.json the job will use: init_from's (resolved) model's, or the one
    published with the checkpoint "<job id>:<step>"."""
    if checkpoints.REF_RE.match(init_from):
        _, ckpt = checkpoints.resolve(store, owner, init_from)
        path = artifacts.checkpoint_file(ckpt.path)
        if (path.parent / "data").is_dir():
            return path.parent / "data" / "tokenizer.json"
        # Written before checkpoints carried their tokenizer: its attempt's work directory.
        return path.parents[2] / path.parent.name / "data" / "tokenizer.json"
    return artifacts.local_dir(init_from) / "tokenizer.json"


def create(
    settings: Settings, store: st.Store, celery, owner: str, req: CreateRequest
) -> st.JobRecord:
    dataset, val_set, spec, labels = _checked(settings, store, owner, req)
    job = st.JobRecord(
        id=st.new_id("job"),
        owner=owner,
        dataset_id=dataset.id,
        model_name=req.model_name or default_model_name(dataset.name),
        model_id=st.new_id("mdl"),
        state=st.QUEUED,
        spec=spec.to_dict(),
        parameters=parameter_count(spec).__dict__,
        request_id=req.request_id,
        created_at=time.time(),
        dataset_path=dataset.path,
        metadata=labels,
        validation_dataset_id=val_set.id if val_set else "",
        validation_dataset_path=val_set.path if val_set else "",
    )
    return _store_and_enqueue(settings, store, celery, job)


def export_checkpoint(
    settings: Settings,
    store: st.Store,
    celery,
    owner: str,
    job_id: str,
    step: int,
    model_name: str = "",
    request_id: str = "",
) -> st.JobRecord:
    """ExportCheckpoint: an export job for the owner's kept checkpoint `job_id` at `step`.

    NotFound for a job or checkpoint the owner does not have; the new job counts against
    max_queued_jobs_per_owner like any other.
    """
    check_id("job_id", job_id)
    check_name("model_name", model_name)
    if len(request_id) > MAX_REQUEST_ID:
        raise errors.InvalidArgument(f"request_id: at most {MAX_REQUEST_ID} characters")
    if step < 0:
        raise errors.InvalidArgument(f"step: must be >= 0, got {step}")
    try:
        source, ckpt = checkpoints.resolve(store, owner, f"{job_id}:{step}")
    except st.NotFound as e:
        raise errors.NotFound(f"job_id/step: {e.message} (see ListCheckpoints)") from None
    job = st.JobRecord(
        id=st.new_id("job"),
        owner=owner,
        dataset_id=source.dataset_id,
        model_name=model_name or source.model_name,
        model_id=st.new_id("mdl"),
        state=st.QUEUED,
        spec=source.spec,
        parameters=source.parameters,
        request_id=request_id,
        created_at=time.time(),
        dataset_path=source.dataset_path,
        metadata=dict(source.metadata),
        export_of=f"{source.id}:{ckpt.step}",
    )
    return _store_and_enqueue(settings, store, celery, job)


def _store_and_enqueue(settings: Settings, store: st.Store, celery, job: st.JobRecord):
    try:
        job, created = store.create_job(job, max_active=settings.max_queued_jobs_per_owner)
    except st.Conflict as e:
        raise errors.ResourceExhausted(f"jobs: {e} (max_queued_jobs_per_owner)") from None
    if created or (job.state == st.QUEUED and not job.enqueued_at):
        # A retry repairs a job whose first enqueue failed after it was saved.
        enqueue(celery, settings, store, job.id)
        job.enqueued_at = time.time()
    return job


def _resolve_spec(settings, store, owner, req: CreateRequest, dataset) -> specs.JobSpec:
    training = dict(req.training)
    base_model = None
    if training.get("init_from"):
        base_model, training["init_from"] = basemodels.resolve(
            store,
            owner,
            training["init_from"],
            settings.base_model_dirs,
            _private_dirs(settings),
        )
    try:
        spec = specs.resolve(
            req.preset,
            dict(req.model),
            training,
            num_distinct_chars=dataset.num_distinct_chars,
            base_model=base_model,
        )
        specs.check_fleet(spec, settings.max_devices_per_job)
        return spec
    except specs.SpecError as e:
        raise errors.InvalidArgument(f"spec.{e}") from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise errors.InvalidArgument(f"spec: {str(e)[:200]}") from None


def _private_dirs(settings) -> list[Path]:
    """Where this host keeps the service's files: init_from may not name a directory there."""
    dirs = [settings.artifact_cache_dir, settings.data_dir / "scratch"]
    return dirs if "://" in settings.artifacts else [settings.artifacts_dir, *dirs]


def parameter_count(spec: specs.JobSpec) -> specs.ParameterCount:
    """The model's parameter count, with what the job trains of it and the FLOPs per token
    that training costs (less with LoRA: frozen weights need no weight gradients)."""
    return dataclasses.replace(
        specs.count_parameters(spec.model),
        trainable=specs.trainable_parameters(spec),
        flops_per_token=specs.training_flops_per_token(spec),
    )


def default_model_name(dataset_name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(dataset_name).stem).strip("-._")[:64]
    return stem or "model"
