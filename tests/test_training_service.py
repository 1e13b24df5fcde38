"""The training path end to end: real Redis, real API server, real Celery worker processes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from conftest import SMALL_CORPUS, Api, make_settings, store_settings
from conftest import model_dir as stored_model_dir

from lmforge.v1 import training_pb2
from lmforge_server.stack import Child, Stack
from lmforge_server.taskqueue import enqueue_training, make_celery

S = training_pb2
# Every test here trains and exports a model: end to end, over ~10 s each.
pytestmark = pytest.mark.slow


def _progress_events(events):
    return [e for e in events if e.type == S.JOB_EVENT_TYPE_PROGRESS]


def test_training_job_succeeds_with_falling_loss_and_registers_a_model(
    api, small_dataset, stack, tiny_shakespeare
):
    job, events, _ = tiny_shakespeare
    assert events[-1].terminal and events[-1].state == S.JOB_STATE_SUCCEEDED, events[-1].message
    states = [e.state for e in events if e.type == S.JOB_EVENT_TYPE_STATE]
    assert states == [
        S.JOB_STATE_QUEUED,
        S.JOB_STATE_RUNNING,
        S.JOB_STATE_EXPORTING,
        S.JOB_STATE_SUCCEEDED,
    ]
    losses = [e.progress.loss for e in _progress_events(events)]
    assert len(losses) >= 5
    assert losses[-1] < losses[0] - 0.5, losses
    evals = [e for e in events if e.type == S.JOB_EVENT_TYPE_EVAL]
    assert evals and all(e.progress.val_bits_per_byte > 0 for e in evals)

    done = api.get(job.id)
    assert done.progress.step == 60 and done.progress.tokens_per_second > 0
    model = api.models.GetModel(S.GetModelRequest(id="tiny-shakespeare@latest"))
    assert model.id == done.model_id and model.state == S.MODEL_STATE_READY
    assert model.parameters.total == job.parameters.total
    model_dir = stored_model_dir(stack, model.id)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metadata.json"):
        assert (model_dir / name).is_file(), name
        assert name in model.files
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["dataset_sha256"] == small_dataset.sha256
    assert meta["parameters"]["total"] == job.parameters.total
    assert meta["spec"]["training"]["seed"] == job.spec.training.seed


def test_watch_resumed_from_an_event_id_yields_exactly_the_remaining_events(api, small_dataset):
    job = api.create(small_dataset.id, max_steps=30, log_interval=2)
    # Read a few events live, drop the stream, then resume from the last one seen.
    stream = api.jobs.WatchJob(S.WatchJobRequest(id=job.id), timeout=300)
    head = [next(stream) for _ in range(4)]
    stream.cancel()
    rest = api.events(job.id, after=head[-1].id)
    full = api.events(job.id)
    assert [e.id for e in head + rest] == [e.id for e in full]
    assert full[-1].terminal
    for k in (0, len(full) // 2, len(full) - 2):
        assert [e.id for e in api.events(job.id, after=full[k].id)] == [e.id for e in full[k + 1 :]]
    with pytest.raises(grpc.RpcError) as e:
        api.events(job.id, after="not-an-id")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cancel_while_running_ends_cancelled_within_seconds_keeping_a_checkpoint(
    api, small_dataset, stack
):
    job = api.create(small_dataset.id, max_steps=1_000_000, checkpoint_interval=1000)
    api.wait_for(job.id, lambda j: j.state == S.JOB_STATE_RUNNING and j.progress.step > 0)
    cancelled = api.jobs.CancelJob(S.CancelJobRequest(id=job.id))
    assert cancelled.state in (S.JOB_STATE_CANCELLING, S.JOB_STATE_CANCELLED)
    # "Within seconds": the loop checks the flag every step; 30 s only bounds a hung test.
    done = api.wait_for(job.id, lambda j: j.state == S.JOB_STATE_CANCELLED, timeout=30)
    events = api.events(job.id)
    assert events[-1].state == S.JOB_STATE_CANCELLED and events[-1].terminal
    assert any(e.type == S.JOB_EVENT_TYPE_CHECKPOINT for e in events)
    checkpoints = list((stack.settings.artifacts_dir / "jobs" / job.id).rglob("*.pt"))
    assert checkpoints, "the cancelled job's checkpoint is kept"
    model = api.models.GetModel(S.GetModelRequest(id=done.model_id))
    assert model.state == S.MODEL_STATE_ABANDONED


def _attempt_steps(events, attempt: int) -> list[int]:
    """Progress steps reported after attempt `attempt` started."""
    start = next(i for i, e in enumerate(events) if e.message.startswith(f"attempt {attempt}"))
    return [e.progress.step for e in _progress_events(events[start:])]


def _checkpoint_steps(events) -> list[int]:
    return [
        int(e.message.rsplit(" ", 1)[-1]) for e in events if e.type == S.JOB_EVENT_TYPE_CHECKPOINT
    ]


@pytest.mark.fault
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_killed_worker_job_resumes_from_its_last_checkpoint_on_a_new_worker(
    request, tmp_path, backend
):
    settings = make_settings(tmp_path, **store_settings(request, backend))
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS.encode())
        job = api.create(ds.id, max_steps=300, checkpoint_interval=25, eval_interval=100)
        api.wait_for(job.id, lambda j: j.progress.step >= 60)
        worker = next(c for c in stack.children if c.role == "worker")
        worker.kill()  # SIGKILL: no checkpoint, no goodbye
        killed_at = api.get(job.id)
        last_checkpoint = max(_checkpoint_steps(api.events_so_far(job.id)))
        assert last_checkpoint >= 25

        fresh = Child("worker", stack.settings, tmp_path / "logs2").start()
        stack.children.append(fresh)
        done = api.wait_terminal(job.id, timeout=300)
        assert done.state == S.JOB_STATE_SUCCEEDED, done.error
        assert done.attempt == 2
        events = api.events(job.id)
        messages = [e.message for e in events if e.type == S.JOB_EVENT_TYPE_STATE]
        assert any("lost; requeued" in m for m in messages), messages
        assert any(m.startswith("attempt 2") and "resuming from" in m for m in messages)
        # Attempt 2 continued from the checkpoint, not from step 0.
        start2 = next(i for i, e in enumerate(events) if e.message.startswith("attempt 2"))
        steps2 = [e.progress.step for e in _progress_events(events[start2:])]
        assert steps2[0] > last_checkpoint and steps2 == sorted(steps2)
        assert killed_at.progress.step >= last_checkpoint


@pytest.mark.fault
def test_redelivered_task_never_trains_a_job_another_worker_holds(tmp_path):
    settings = make_settings(tmp_path)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        second = Child("worker", stack.settings, tmp_path / "logs2").start()
        stack.children.append(second)
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS.encode())
        job = api.create(ds.id, max_steps=150)
        api.wait_for(job.id, lambda j: j.state == S.JOB_STATE_RUNNING and j.progress.step > 0)
        # What Celery does after a visibility timeout or a lost connection: deliver again.
        enqueue_training(make_celery(stack.settings), stack.settings, job.id)
        deadline = time.monotonic() + 60
        logs = ""
        while "skipping this delivery" not in logs and time.monotonic() < deadline:
            time.sleep(0.2)
            logs = "".join(c.log_tail(100_000) for c in stack.children)
        assert "skipping this delivery" in logs
        done = api.wait_terminal(job.id)
        assert done.state == S.JOB_STATE_SUCCEEDED and done.attempt == 1
        starts = [e for e in api.events(job.id) if e.message.startswith("attempt ")]
        assert len(starts) == 1


@pytest.mark.fault
def test_worker_shutdown_checkpoints_and_another_worker_finishes_the_job(tmp_path):
    settings = make_settings(tmp_path)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS.encode())
        job = api.create(ds.id, max_steps=300, checkpoint_interval=1000)
        api.wait_for(job.id, lambda j: j.progress.step >= 40)
        worker = next(c for c in stack.children if c.role == "worker")
        worker.stop()  # SIGTERM: warm shutdown
        requeued = api.get(job.id)
        assert requeued.state == S.JOB_STATE_QUEUED
        shutdown_step = _checkpoint_steps(api.events_so_far(job.id))[-1]
        assert shutdown_step >= 40
        stack.children.append(Child("worker", stack.settings, tmp_path / "logs2").start())
        done = api.wait_terminal(job.id, timeout=300)
        assert done.state == S.JOB_STATE_SUCCEEDED and done.attempt == 2
        # Attempt 2 resumed from the shutdown checkpoint, not from step 0.
        first = _attempt_steps(api.events(job.id), 2)[0]
        assert shutdown_step < first <= shutdown_step + done.spec.training.log_interval


def test_a_model_failing_onnx_parity_fails_its_job_and_registers_nothing(tmp_path):
    # A limit no real export meets: the parity check must fail the job, not pass it through.
    settings = make_settings(tmp_path, parity_limit=1e-12)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS[:20_000].encode())
        job = api.create(ds.id, max_steps=10)
        done = api.wait_terminal(job.id)
        assert done.state == S.JOB_STATE_FAILED
        assert "parity" in done.error.lower(), done.error
        model = api.models.GetModel(S.GetModelRequest(id=done.model_id))
        assert model.state == S.MODEL_STATE_ABANDONED
        models_dir = stack.settings.artifacts_dir / "models"
        assert not models_dir.exists() or not any(models_dir.iterdir())


def test_fine_tuning_starts_from_a_registered_model_and_deleting_it_removes_its_files(
    api, small_dataset, stack, tiny_shakespeare
):
    base, _, done = tiny_shakespeare
    assert done.state == S.JOB_STATE_SUCCEEDED
    with pytest.raises(grpc.RpcError) as e:
        api.create(small_dataset.id, init_from="tiny-shakespeare@latest", model_n_layers=3)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.model.n_layers" in e.value.details() and "init_from" in e.value.details()

    tuned = api.create(
        small_dataset.id,
        model_name="ft-child",
        init_from=f"tiny-shakespeare@{api.models.GetModel(S.GetModelRequest(id=done.model_id)).version}",
        max_steps=10,
        log_interval=1,
    )
    assert tuned.spec.model == base.spec.model
    assert api.wait_terminal(tuned.id).state == S.JOB_STATE_SUCCEEDED
    first_loss = _progress_events(api.events(tuned.id))[0].progress.loss
    base_first = _progress_events(api.events(base.id))[0].progress.loss
    # Started from trained weights, not from scratch.
    assert first_loss < base_first - 0.5, (first_loss, base_first)

    child = api.models.GetModel(S.GetModelRequest(id="ft-child"))
    model_dir = stored_model_dir(stack, child.id)
    assert model_dir.is_dir()
    api.models.DeleteModel(S.DeleteModelRequest(id="ft-child@1"))
    assert not model_dir.exists()
    with pytest.raises(grpc.RpcError) as e:
        api.models.GetModel(S.GetModelRequest(id=child.id))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_fine_tuning_starts_from_a_local_hugging_face_llama_directory(api, small_dataset, stack):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge_worker.tokenization import build_tokenizer, save_tokenizer

    tok = build_tokenizer("byte", SMALL_CORPUS)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg)
    tmp_path = Path(stack.settings.base_model_dirs[0])  # the server's allow-list
    hf.save_pretrained(tmp_path / "hf")
    save_tokenizer(tok, tmp_path / "hf" / "tokenizer.json")

    job = api.create(small_dataset.id, init_from=str(tmp_path / "hf"), max_steps=10)
    assert job.spec.model.tokenizer == "pretrained"
    assert job.spec.model.n_kv_heads == 2 and job.spec.model.tie_embeddings is False
    assert job.parameters.total == sum(p.numel() for p in hf.parameters())
    done = api.wait_terminal(job.id)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.error

    with pytest.raises(grpc.RpcError) as e:
        api.create(small_dataset.id, init_from=str(tmp_path / "missing"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "spec.training.init_from" in e.value.details()


@pytest.mark.fault
def test_a_job_survives_its_redis_being_killed_and_restarted(tmp_path):
    settings = make_settings(tmp_path, lease_ttl_s=2.0)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS.encode())
        job = api.create(ds.id, max_steps=2000, checkpoint_interval=100)
        api.wait_for(job.id, lambda j: j.progress.step >= 120)  # the step-100 checkpoint is kept
        time.sleep(1.5)  # AOF is fsynced every second: what is older than that survives
        before = api.get(job.id)
        stack.redis.stop(kill=True)
        # Down longer than the 2 s lease: Redis comes back without it, the reaper requeues
        # the job and the next attempt must resume from the last checkpoint Redis kept.
        time.sleep(3.0)
        stack.redis.start()  # same port, same directory: it replays the AOF
        done = api.wait_terminal(job.id, timeout=300)
        assert done.state == S.JOB_STATE_SUCCEEDED, done.error
        assert before.state == S.JOB_STATE_RUNNING and before.progress.step < 1500
        assert done.progress.step == 2000
        model = api.models.GetModel(S.GetModelRequest(id=done.model_id))
        assert model.state == S.MODEL_STATE_READY
        # Every later attempt resumed from a checkpoint (>= 100), never from step 0.
        events = api.events(job.id)
        checkpoints = _checkpoint_steps(events)
        every = done.spec.training.log_interval
        assert done.attempt >= 2
        for attempt in range(2, done.attempt + 1):
            first = _attempt_steps(events, attempt)[0]
            kept = max((c for c in checkpoints if c < first), default=0)
            assert kept >= 100 and first - kept <= every, (attempt, first, checkpoints)


@pytest.mark.fault
def test_a_worker_killed_during_export_leaves_no_half_model_and_the_job_still_succeeds(tmp_path):
    # The export (graph, int8 and int4, each scored on the validation split) lasts long
    # enough to be killed in.
    settings = make_settings(tmp_path)
    with Stack(settings, inference=False) as stack, grpc.insecure_channel(stack.api_addr) as ch:
        api = Api(ch)
        ds = api.upload(SMALL_CORPUS.encode())
        job = api.create(ds.id, max_steps=30)
        api.wait_for(job.id, lambda j: j.state == S.JOB_STATE_EXPORTING, timeout=120)
        next(c for c in stack.children if c.role == "worker").kill()
        model = api.models.GetModel(S.GetModelRequest(id=job.model_id))
        assert model.state == S.MODEL_STATE_TRAINING  # nothing registered half-way

        stack.children.append(Child("worker", stack.settings, tmp_path / "logs2").start())
        done = api.wait_terminal(job.id, timeout=300)
        assert done.state == S.JOB_STATE_SUCCEEDED and done.attempt == 2, done.error
        model = api.models.GetModel(S.GetModelRequest(id=job.model_id))
        assert model.state == S.MODEL_STATE_READY
        models_dir = stack.settings.artifacts_dir / "models"
        assert [p.name for p in models_dir.iterdir()] == [model.id]  # no temporaries left
        assert "model.onnx" in model.files
