"""Training as a product, through the real service (Redis, API server, Celery worker):
pause and resume, metrics, a target validation loss, labels."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from pathlib import Path

import grpc
import pytest
import torch
from conftest import (
    CORPUS,
    SMALL_CORPUS,
    job_scratch,
    model_dir,
    stored_checkpoint_file,
    stored_checkpoints,
    unique,
)

from lmforge import Client
from lmforge.cli import main as cli_main
from lmforge.v1 import common_pb2, training_pb2
from lmforge_worker.training import load_checkpoint

S = training_pb2


def _final_weights(stack, job_id: str) -> dict[str, torch.Tensor]:
    """The model weights of the job's last checkpoint (the one written at its end)."""
    from lmforge_server.artifacts import ArtifactStore

    *_, last = stored_checkpoints(stack, job_id).values()
    return load_checkpoint(ArtifactStore.from_settings(stack.settings).checkpoint_file(last))[
        "model"
    ]


def _abort_code(fn, *args):
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value.code(), e.value.details()


@pytest.mark.slow
def test_pause_then_resume_ends_with_the_same_weights_as_an_uninterrupted_run(
    api, small_dataset, stack
):
    spec = dict(max_steps=400, eval_interval=100, checkpoint_interval=1000, log_interval=10)
    straight = api.create(small_dataset.id, **spec)
    assert api.wait_terminal(straight.id).state == S.JOB_STATE_SUCCEEDED

    job = api.create(small_dataset.id, **spec)
    api.wait_for(job.id, lambda j: j.state == S.JOB_STATE_RUNNING and j.progress.step >= 20)
    api.jobs.PauseJob(S.PauseJobRequest(id=job.id))
    paused = api.wait_for(job.id, lambda j: j.state == S.JOB_STATE_PAUSED, timeout=60)
    assert paused.progress.step >= 20
    time.sleep(1.0)  # no worker trains a paused job
    assert api.get(job.id).progress.step == paused.progress.step
    assert api.jobs.PauseJob(S.PauseJobRequest(id=job.id)).state == S.JOB_STATE_PAUSED

    resumed = api.jobs.ResumeJob(S.ResumeJobRequest(id=job.id))
    assert resumed.state in (S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING)
    done = api.wait_terminal(job.id)
    assert done.state == S.JOB_STATE_SUCCEEDED and done.attempt == 2, done.error
    states = [e.message for e in api.events(job.id) if e.type == S.JOB_EVENT_TYPE_STATE]
    paused_at = next(int(m.split()[-1]) for m in states if m.startswith("paused at step"))
    assert paused.progress.step <= paused_at < 400
    assert any(m.startswith("attempt 2") and "resuming from" in m for m in states)

    a, b = _final_weights(stack, straight.id), _final_weights(stack, job.id)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the straight one"
    assert done.progress.best_val_loss == api.get(straight.id).progress.best_val_loss


@pytest.mark.slow
def test_pausing_and_resuming_a_lora_job_ends_with_the_weights_of_an_uninterrupted_run(
    api, small_dataset, stack, tiny_shakespeare
):
    base = api.wait_terminal(tiny_shakespeare[0].id)
    assert base.state == S.JOB_STATE_SUCCEEDED
    # Adapter dropout draws from the torch RNG every step: the resume must restore it too.
    spec = dict(
        init_from=base.model_id,
        lora_rank=4,
        lora_alpha=8.0,
        lora_dropout=0.1,
        lora_targets="q_proj,v_proj,down_proj",
        max_steps=300,
        eval_interval=100,
        checkpoint_interval=1000,
        log_interval=10,
    )
    straight = api.create(small_dataset.id, **spec)
    assert api.wait_terminal(straight.id).state == S.JOB_STATE_SUCCEEDED

    job = api.create(small_dataset.id, **spec)
    api.wait_for(job.id, lambda j: j.state == S.JOB_STATE_RUNNING and j.progress.step >= 20)
    api.jobs.PauseJob(S.PauseJobRequest(id=job.id))
    paused = api.wait_for(job.id, lambda j: j.state == S.JOB_STATE_PAUSED, timeout=60)
    assert paused.progress.step < 300, "the job ended before the pause: nothing was tested"
    api.jobs.ResumeJob(S.ResumeJobRequest(id=job.id))
    done = api.wait_terminal(job.id)
    assert done.state == S.JOB_STATE_SUCCEEDED and done.attempt == 2, done.error

    a, b = _final_weights(stack, straight.id), _final_weights(stack, job.id)
    adapters = {k for k in a if ".lora_" in k}
    assert len(adapters) == 2 * 3 * 2 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed LoRA run diverged"
    assert done.progress.best_val_loss == api.get(straight.id).progress.best_val_loss


def test_pause_and_resume_answer_clearly_in_every_state(api, small_dataset):
    code, details = _abort_code(api.jobs.PauseJob, S.PauseJobRequest(id="job_nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = _abort_code(api.jobs.ResumeJob, S.ResumeJobRequest())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "id" in details

    job = api.create(small_dataset.id, max_steps=1_000_000, checkpoint_interval=1_000_000)
    paused = api.jobs.PauseJob(S.PauseJobRequest(id=job.id))
    assert paused.state in (S.JOB_STATE_PAUSED, S.JOB_STATE_RUNNING, S.JOB_STATE_QUEUED)
    api.wait_for(job.id, lambda j: j.state == S.JOB_STATE_PAUSED, timeout=60)
    cancelled = api.jobs.CancelJob(S.CancelJobRequest(id=job.id))
    assert cancelled.state == S.JOB_STATE_CANCELLED  # a paused job holds no worker
    for rpc, req in (
        (api.jobs.PauseJob, S.PauseJobRequest),
        (api.jobs.ResumeJob, S.ResumeJobRequest),
    ):
        code, details = _abort_code(rpc, req(id=job.id))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "cancelled" in details, details


def test_metrics_rows_equal_the_progress_and_eval_events(api, small_dataset, stack):
    job = api.create(small_dataset.id, max_steps=40, log_interval=5, eval_interval=20)
    assert api.wait_terminal(job.id).state == S.JOB_STATE_SUCCEEDED
    events = api.events(job.id)
    rows = list(api.jobs.GetJobMetrics(S.GetJobMetricsRequest(id=job.id)))

    progress = [e.progress for e in events if e.type == S.JOB_EVENT_TYPE_PROGRESS]
    evals = {e.progress.step: e.progress for e in events if e.type == S.JOB_EVENT_TYPE_EVAL}
    assert [r.step for r in rows] == [p.step for p in progress] == list(range(5, 41, 5))
    for row, p in zip(rows, progress, strict=True):
        assert (row.loss, row.learning_rate, row.grad_norm, row.tokens_per_second) == (
            p.loss,
            p.learning_rate,
            p.grad_norm,
            p.tokens_per_second,
        )
        assert row.grad_norm > 0 and row.tokens_seen == p.tokens_seen
        if row.step in evals:
            assert row.HasField("val_loss") and row.val_loss == evals[row.step].val_loss
            assert row.val_bits_per_byte == evals[row.step].val_bits_per_byte
        else:
            assert not row.HasField("val_loss")
    assert sorted(evals) == [20, 40]

    # The worker's TensorBoard event files (Settings.tensorboard) hold the same numbers.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = job_scratch(stack, job.id) / "tensorboard"
    acc = EventAccumulator(str(runs / "attempt-1"))
    acc.Reload()

    def scalars(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert scalars("train/loss") == [(r.step, pytest.approx(r.loss, rel=1e-6)) for r in rows]
    assert scalars("train/grad_norm") == [
        (r.step, pytest.approx(r.grad_norm, rel=1e-6)) for r in rows
    ]
    assert scalars("val/loss") == [
        (s, pytest.approx(evals[s].val_loss, rel=1e-6)) for s in sorted(evals)
    ]

    code, _ = _abort_code(lambda: list(api.jobs.GetJobMetrics(S.GetJobMetricsRequest(id="job_x"))))
    assert code == grpc.StatusCode.NOT_FOUND

    with Client(api_addr=stack.api_addr) as client:
        sdk_rows = client.jobs.metrics(job.id)
    assert [(r.step, r.loss, r.val_loss is None) for r in sdk_rows] == [
        (r.step, pytest.approx(r.loss, rel=1e-6), not r.HasField("val_loss")) for r in rows
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli_main(["--api", stack.api_addr, "jobs", "metrics", job.id, "--csv"])
    assert exit_.value.code == 0
    table = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [int(r["step"]) for r in table] == [r.step for r in rows]
    for line, row in zip(table, rows, strict=True):
        assert float(line["loss"]) == pytest.approx(row.loss, rel=1e-6)
        assert float(line["grad_norm"]) == pytest.approx(row.grad_norm, rel=1e-6)
        expected = f"{row.val_loss:.7g}" if row.HasField("val_loss") else ""
        got = f"{float(line['val_loss']):.7g}" if line["val_loss"] else ""
        assert got == expected


def test_target_val_loss_ends_the_job_succeeded_at_the_first_evaluation_reaching_it(
    api, small_dataset
):
    job = api.create(small_dataset.id, max_steps=5000, eval_interval=10, target_val_loss=3.2)
    assert job.spec.training.target_val_loss == pytest.approx(3.2)
    done = api.wait_terminal(job.id)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.error
    evals = [e.progress for e in api.events(job.id) if e.type == S.JOB_EVENT_TYPE_EVAL]
    assert evals[-1].val_loss <= 3.2 < min(p.val_loss for p in evals[:-1])
    assert done.progress.step == evals[-1].step < 5000
    model = api.models.GetModel(S.GetModelRequest(id=done.model_id))
    assert model.state == S.MODEL_STATE_READY

    code, details = _abort_code(lambda: api.create(small_dataset.id, target_val_loss=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.training.target_val_loss" in details


def test_jobs_carry_labels_and_list_filters_on_them(api, small_dataset):
    run = unique("run")

    def create(labels):
        req = S.CreateJobRequest(
            dataset_id=small_dataset.id, spec=S.JobSpec(preset="tiny"), metadata=labels
        )
        job = api.jobs.CreateJob(req)
        api.jobs.CancelJob(S.CancelJobRequest(id=job.id))  # labels only: no training needed
        return job

    a = create({"run": run, "team": "nlp"})
    b = create({"run": run, "team": "vision"})
    assert dict(a.metadata) == {"run": run, "team": "nlp"}
    assert dict(api.get(b.id).metadata) == {"run": run, "team": "vision"}

    def listed(**labels):
        return [j.id for j in api.jobs.ListJobs(S.ListJobsRequest(metadata=labels)).jobs]

    assert listed(run=run) == [b.id, a.id]
    assert listed(run=run, team="nlp") == [a.id]
    assert listed(run=run, team="audio") == []
    for job in (a, b):  # a worker may have taken one before its cancel: it ends at a step
        api.wait_terminal(job.id)
    cancelled = api.jobs.ListJobs(
        S.ListJobsRequest(metadata={"run": run}, state=S.JOB_STATE_CANCELLED)
    )
    assert {j.id for j in cancelled.jobs} == {a.id, b.id}

    too_many = {f"k{i}": "v" for i in range(17)}
    for labels, expected in (
        (too_many, "metadata: at most 16 pairs"),
        ({"bad key": "v"}, "metadata: key 'bad key'"),
        ({"k": "v" * 513}, "metadata[k]: at most 512 characters"),
    ):
        code, details = _abort_code(create, labels)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in details, details
    code, details = _abort_code(lambda: listed(**{"": "x"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "metadata" in details


def test_downloaded_model_opens_in_transformers_with_the_logits_of_our_model(
    api, small_dataset, stack, tmp_path
):
    from transformers import AutoModelForCausalLM

    from lmforge_worker.model import load_pretrained

    name = unique("dl")
    job = api.create(small_dataset.id, model_name=name, max_steps=20)
    assert api.wait_terminal(job.id).state == S.JOB_STATE_SUCCEEDED
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli_main(["--api", stack.api_addr, "models", "download", name, str(tmp_path / "m")])
    assert exit_.value.code == 0
    model = api.models.GetModel(S.GetModelRequest(id=name))
    written = sorted(Path(p).name for p in out.getvalue().split())
    assert written == sorted(model.files) and "model.onnx" in written
    served = model_dir(stack, model.id)
    for f in written:
        assert (tmp_path / "m" / f).read_bytes() == (served / f).read_bytes(), f

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ours, _ = load_pretrained(tmp_path / "m")
    ids = torch.randint(0, model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = ours.eval()(ids)
        got = hf(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()

    code, _ = _abort_code(lambda: list(api.models.DownloadModel(S.DownloadModelRequest(id="nope"))))
    assert code == grpc.StatusCode.NOT_FOUND
    running = api.create(small_dataset.id, max_steps=1_000_000)
    code, details = _abort_code(
        lambda: list(api.models.DownloadModel(S.DownloadModelRequest(id=running.model_id)))
    )
    api.jobs.CancelJob(S.CancelJobRequest(id=running.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "ready" in details, details


def test_checkpoints_keep_the_best_and_newest_and_start_new_jobs(api, small_dataset, stack):
    job = api.create(small_dataset.id, max_steps=120, checkpoint_interval=20, log_interval=20)
    assert api.wait_terminal(job.id).state == S.JOB_STATE_SUCCEEDED
    events = api.events(job.id)
    losses = {
        e.progress.step: e.progress.loss for e in events if e.type == S.JOB_EVENT_TYPE_PROGRESS
    }
    evals = {e.progress.step: e.progress for e in events if e.type == S.JOB_EVENT_TYPE_EVAL}
    kept = api.jobs.ListCheckpoints(S.ListCheckpointsRequest(id=job.id)).checkpoints
    best = min(evals, key=lambda s: (evals[s].val_loss, -s))
    # keep_checkpoints is 3 in these settings: the newest three and the best.
    assert [c.step for c in kept] == sorted({80, 100, 120, best})
    for c in kept:
        assert c.ref == f"{job.id}:{c.step}" and c.val_step == c.step
        assert c.train_loss == losses[c.step] and c.val_loss == evals[c.step].val_loss
        assert c.val_bits_per_byte == evals[c.step].val_bits_per_byte
        assert c.created_at.ToNanoseconds() > job.created_at.ToNanoseconds()
    assert list(stored_checkpoints(stack, job.id)) == [c.step for c in kept]

    fresh = api.create(small_dataset.id, max_steps=5, log_interval=1)
    tuned = api.create(small_dataset.id, init_from=f"{job.id}:80", max_steps=5, log_interval=1)
    assert tuned.spec.model == job.spec.model
    for j in (fresh, tuned):
        assert api.wait_terminal(j.id).state == S.JOB_STATE_SUCCEEDED, api.get(j.id).error
    first = [
        next(e.progress.loss for e in api.events(j.id) if e.type == S.JOB_EVENT_TYPE_PROGRESS)
        for j in (fresh, tuned)
    ]
    assert first[1] < first[0] - 0.5 and abs(first[1] - losses[80]) < 0.5, (first, losses[80])

    for ref in ("job_0123456789abcdef:80", f"{job.id}:7"):
        code, details = _abort_code(lambda r=ref: api.create(small_dataset.id, init_from=r))
        assert code == grpc.StatusCode.NOT_FOUND and "spec.training.init_from" in details
    code, _ = _abort_code(api.jobs.ListCheckpoints, S.ListCheckpointsRequest(id="job_nope"))
    assert code == grpc.StatusCode.NOT_FOUND


def _estimates(events) -> list[tuple[int, int, float, float]]:
    return [
        (e.progress.step, e.progress.total_steps, e.progress.estimated_finish.ToNanoseconds() / 1e9,
         e.time.ToNanoseconds() / 1e9)
        for e in events
        if e.type == S.JOB_EVENT_TYPE_PROGRESS
    ]  # fmt: skip


@pytest.mark.slow
def test_a_kept_checkpoint_exports_as_a_model_version_and_progress_estimates_the_finish(
    api, small_dataset, stack, tmp_path
):
    job = api.create(
        small_dataset.id, max_steps=60, checkpoint_interval=20, eval_interval=20, log_interval=10
    )
    assert api.wait_terminal(job.id).state == S.JOB_STATE_SUCCEEDED
    # Every logged step carries an estimate: ahead of its event while steps remain, and
    # no later than the event once the last step is done.
    estimates = _estimates(api.events(job.id))
    assert [s for s, *_ in estimates] == [10, 20, 30, 40, 50, 60]
    for step, total, finish, at in estimates:
        assert (finish > at) if step < total else (0 < finish <= at), (step, finish, at)

    with Client(api_addr=stack.api_addr) as client:
        kept = client.jobs.checkpoints(job.id)
        assert [c.step for c in kept] == [20, 40, 60]
        finish = client.jobs.get(job.id).progress.estimated_finish.timestamp()
        assert finish == pytest.approx(estimates[-1][2], abs=1e-5)  # datetime: microseconds
        name = unique("from-ckpt")
        export = client.jobs.export_checkpoint(job.id, 40, model_name=name)
        assert (export.export_of, export.model_name) == (f"{job.id}:40", name)
        done = client.jobs.wait(export.id, timeout=240)
        model = client.models.get(done.model_id)
        assert (model.name, model.version, model.job_id) == (name, 1, export.id)
        assert model.onnx_parity_max_abs_diff <= stack.settings.parity_limit
        assert model.val_loss == pytest.approx(kept[1].val_loss, rel=1e-6)
        client.models.download(model.id, tmp_path / "m")
    # The registered weights are the checkpoint's, not the run's best or last.
    from safetensors.torch import load_file

    from lmforge_server.specs import JobSpec
    from lmforge_worker.model import Llama, hf_state_dict

    ckpt_path = stored_checkpoint_file(stack, job.id, 40)
    ckpt = load_checkpoint(ckpt_path)
    net = Llama(JobSpec.from_dict(ckpt["spec"]).model)
    net.load_state_dict(ckpt["model"])
    registered = load_file(tmp_path / "m" / "model.safetensors")
    expected = hf_state_dict(net)
    assert registered.keys() == expected.keys()
    assert all(torch.equal(registered[k], expected[k]) for k in expected)

    for job_id, step, code_ in (
        (job.id, 30, grpc.StatusCode.NOT_FOUND),  # not kept
        ("job_0123456789abcdef", 40, grpc.StatusCode.NOT_FOUND),
        (job.id, -1, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        req = S.ExportCheckpointRequest(job_id=job_id, step=step)
        code, details = _abort_code(api.jobs.ExportCheckpoint, req)
        assert code == code_ and ("step" in details), details
    # A retry with the same request_id is the same export job.
    req = S.ExportCheckpointRequest(job_id=job.id, step=20, request_id=unique("exp"))
    first, again = api.jobs.ExportCheckpoint(req), api.jobs.ExportCheckpoint(req)
    assert first.id == again.id and first.export_of == f"{job.id}:20"
    assert first.model_name == job.model_name  # model_name empty: the training job's
    code, details = _abort_code(api.jobs.PauseJob, S.PauseJobRequest(id=first.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "exports a checkpoint" in details
    api.jobs.CancelJob(S.CancelJobRequest(id=first.id))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli_main(["--api", stack.api_addr, "--json", "jobs", "checkpoints", job.id])
    assert exit_.value.code == 0 and f"{job.id}:40" in out.getvalue()


def test_retention_keeps_the_best_checkpoint_even_when_it_is_old():
    from lmforge_server.checkpoints import Checkpoint, to_drop

    val = {10: 3.0, 20: 2.0, 30: 2.5, 40: 2.6, 50: 2.7}
    ckpts = [Checkpoint(s, f"/c/{s}", 1.0, v, 1.0, s, 0.0) for s, v in val.items()]
    assert [c.step for c in to_drop(ckpts, keep_last=2)] == [10, 30]
    assert [c.step for c in to_drop(ckpts, keep_last=0)] == [10, 30, 40]


def test_validate_only_reports_the_job_without_running_it(api, small_dataset, stack):
    api_addr = stack.api_addr
    done = api.create(small_dataset.id, max_steps=20)  # a measured throughput to estimate from
    assert api.wait_terminal(done.id).state == S.JOB_STATE_SUCCEEDED
    before = [j.id for j in api.jobs.ListJobs(S.ListJobsRequest()).jobs]

    def validate(dataset_id, **training):
        req = S.CreateJobRequest(
            dataset_id=dataset_id,
            spec=S.JobSpec(preset="tiny", training=common_pb2.TrainingSpec(**training)),
            validate_only=True,
        )
        return api.jobs.CreateJob(req)

    good = validate(small_dataset.id, max_steps=200)
    r = good.validation
    assert good.id == "" and good.state == S.JOB_STATE_UNSPECIFIED
    assert (r.corpus_tokens, r.tokens_exact) == (len(SMALL_CORPUS), True)
    assert (r.train_tokens, r.val_tokens) == (54_000, 6_000)
    assert r.vocab_size == small_dataset.num_distinct_chars + 1 == good.spec.model.vocab_size
    assert r.weights_bytes == 4 * good.parameters.total
    assert r.optimizer_bytes == 12 * good.parameters.total and r.activations_bytes > 0
    assert r.training_flops == good.parameters.flops_per_token * 8 * 32 * 200
    assert r.estimated_seconds["cpu"] > 0 and list(r.problems) == []
    assert r.estimate_measured and r.trainable_parameters == good.parameters.total
    assert r.characters_lost == 0

    # A base model's char tokenizer drops what its corpus never had: 7 'ñ' and 3 '€'.
    assert not {"ñ", "€"} & set(SMALL_CORPUS)
    odd = api.upload((SMALL_CORPUS[:5000] + "ñ" * 7 + "€" * 3).encode(), name=unique("odd"))
    lossy = validate(odd.id, init_from=done.model_id).validation
    assert lossy.characters_lost == 10
    assert "cannot encode 2 distinct characters of the corpus (10 occurrences: 'ñ', '€')" in (
        "\n".join(lossy.problems)
    )
    assert validate(odd.id).validation.characters_lost == 0  # its own tokenizer loses none
    with Client(api_addr=api_addr) as client:
        report = client.jobs.validate(
            dataset=odd.id, preset="tiny", training={"init_from": done.model_id}
        )
    assert report.characters_lost == 10 and report.spec.training.init_from

    tiny = api.upload(b"To be, or not to be: that is the question.", name=unique("tiny"))
    bad = validate(tiny.id).validation
    assert bad.corpus_tokens == 42 and bad.train_tokens == 38 and bad.val_tokens == 4
    problems = "\n".join(bad.problems)
    assert "train split would hold" not in problems  # 38 tokens fit one context of 32
    assert "one batch (8 x 32 tokens) is larger than the train split (38 tokens)" in problems
    assert "the validation split would hold 4 tokens" in problems
    assert "read the train split" in problems
    assert [j.id for j in api.jobs.ListJobs(S.ListJobsRequest()).jobs] == before
    for dataset_id, code in ((small_dataset.id, 0), (tiny.id, 1)):  # 1: problems found
        out = io.StringIO()
        argv = ["--api", api_addr, "--json", "train", dataset_id, "--preset", "tiny"]
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            cli_main([*argv, "--validate-only"])
        assert exit_.value.code == code
        assert json.loads(out.getvalue())["corpus_tokens"] in (len(SMALL_CORPUS), 42)
    assert [j.id for j in api.jobs.ListJobs(S.ListJobsRequest()).jobs] == before


def test_a_validation_dataset_of_the_users_own_replaces_the_split(api, small_dataset):
    known = set(SMALL_CORPUS)
    val_text = "".join(c for c in CORPUS[200_000:205_000] if c in known)
    val_set = api.upload(val_text.encode(), name=unique("val"))
    req = S.CreateJobRequest(
        dataset_id=small_dataset.id,
        spec=S.JobSpec(preset="tiny", training=common_pb2.TrainingSpec(max_steps=20)),
        validation_dataset_id=val_set.id,
    )
    job = api.jobs.CreateJob(req)
    assert job.validation_dataset_id == val_set.id
    assert api.wait_terminal(job.id).state == S.JOB_STATE_SUCCEEDED
    started = next(e.message for e in api.events(job.id) if e.message.startswith("training "))
    # All of the training corpus trains and all of the validation corpus evaluates.
    assert f"{len(SMALL_CORPUS):,} train / {len(val_text):,} val tokens" in started, started

    req.validation_dataset_id = "0" * 64
    code, details = _abort_code(api.jobs.CreateJob, req)
    assert code == grpc.StatusCode.NOT_FOUND and "validation_dataset_id" in details


def test_throughput_is_a_moving_average_per_device_class_with_a_fallback_rate(redis_server):
    from lmforge_server import specs, validation
    from lmforge_server import store as st

    store = st.Store.from_url(redis_server.url)
    spec = specs.resolve("tiny", {}, {"max_steps": 100}, num_distinct_chars=64)
    ds = st.DatasetRecord("d" * 64, "o", "d", "d" * 64, 50_000, 50_000, 64, 0.0, "/nowhere")
    flops = specs.count_parameters(spec.model).flops_per_token * 8 * 32 * 100
    guess = validation.report(spec, ds, validation.throughputs(store), fallback_flops=1e9)
    assert not guess.estimate_measured and guess.estimated_seconds == {
        "cpu": pytest.approx(flops / 1e9)
    }
    validation.record_throughput(store, "cpu", 100.0)
    validation.record_throughput(store, "cpu", 200.0)
    validation.record_throughput(store, "NVIDIA H200", 5e6)
    assert validation.throughputs(store) == {"cpu": pytest.approx(130.0), "NVIDIA H200": 5e6}
    measured = validation.report(spec, ds, validation.throughputs(store), fallback_flops=1e9)
    assert measured.estimate_measured
    assert measured.estimated_seconds == {
        "cpu": pytest.approx(flops / 130.0),
        "NVIDIA H200": pytest.approx(flops / 5e6),
    }


def test_validation_estimates_count_attention_scores_and_lora_flops_by_the_formula():
    from lmforge_server import specs, validation
    from lmforge_server import store as st

    ds = st.DatasetRecord("d" * 64, "o", "d", "d" * 64, 1 << 20, 1 << 20, 65, 0.0, "/nowhere")
    model = dict(n_layers=4, n_heads=4, d_model=128, context_length=64)
    full = specs.resolve(
        "small", model, {"max_steps": 10, "warmup_steps": 0}, num_distinct_chars=65
    )
    L, H, d, T, B, V, ff = 4, 4, 128, 64, 12, 66, 384
    r = validation.report(full, ds, {"cpu": 1e9})
    # Per token, layer and width 34 values, 2 per logit; per layer 2 x B x heads x T x T.
    assert r.activations_bytes == 4 * (B * T * (34 * L * d + 2 * V) + L * 2 * B * H * T * T)
    n = L * (4 * d * d + 3 * d * ff) + V * d  # weights of the matmuls, lm_head included
    assert specs.training_flops_per_token(full) == 6 * n + 12 * L * d * T
    assert r.training_flops == (6 * n + 12 * L * d * T) * B * T * 10

    # LoRA: 2N forward and 2N for the input gradients through frozen weights, none for
    # their own gradients; the adapters (r x (in + out) each) cost 6 per parameter.
    lora = specs.resolve(
        "small",
        model,
        {
            "max_steps": 10,
            "warmup_steps": 0,
            "lora_rank": 8,
            "lora_targets": "q_proj,down_proj",
            "init_from": "x",
        },
        num_distinct_chars=65,
    )
    trainable = L * 8 * ((d + d) + (ff + d))
    assert specs.trainable_parameters(lora) == trainable
    flops = 4 * n + 6 * trainable + 12 * L * d * T
    assert specs.training_flops_per_token(lora) == flops
    r = validation.report(lora, ds, {"cpu": 1e9})
    assert r.training_flops == flops * B * T * 10
    assert r.estimated_seconds["cpu"] == pytest.approx(flops * B * T * 10 / 1e9)


@pytest.mark.slow
def test_lora_trains_only_the_adapters_and_exports_the_merged_model(
    api, stack, tiny_shakespeare, tmp_path
):
    import numpy as np
    import onnxruntime as ort
    from safetensors.torch import load_file
    from test_export import empty, run

    from lmforge_server.specs import JobSpec
    from lmforge_worker.model import Llama, add_lora, hf_state_dict, load_pretrained

    base_job = api.wait_terminal(tiny_shakespeare[0].id)
    assert base_job.state == S.JOB_STATE_SUCCEEDED
    job = api.create(
        base_job.dataset_id,
        init_from=base_job.model_id,
        lora_rank=4,
        lora_alpha=8.0,
        lora_targets="q_proj,v_proj,down_proj",
        learning_rate=1e-2,
        max_steps=30,
        eval_interval=30,  # one evaluation, at the end: the best weights are the last
        checkpoint_interval=30,
    )
    # tiny: 2 layers, d_model 32, MLP 86 wide: r (in + out) per adapted projection.
    d, ff = 32, job.spec.model.intermediate_size
    assert job.parameters.trainable == 2 * 4 * ((d + d) + (d + d) + (ff + d))
    assert job.parameters.trainable < job.parameters.total
    done = api.wait_terminal(job.id)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.error
    started = next(e.message for e in api.events(job.id) if e.message.startswith("training "))
    assert f"{job.parameters.trainable:,} of {job.parameters.total:,} parameters" in started

    with Client(api_addr=stack.api_addr) as client:
        client.models.download(base_job.model_id, tmp_path / "base")
        client.models.download(done.model_id, tmp_path / "lora")
    base = load_file(tmp_path / "base" / "model.safetensors")
    ckpt_path = stored_checkpoint_file(stack, job.id, 30)
    ckpt = load_checkpoint(ckpt_path)
    state = ckpt["model"]
    adapters = {k for k in state if ".lora_" in k}
    assert len(adapters) == 2 * 3 * 2
    assert all(state[k].abs().max() > 0 for k in adapters if k.endswith("lora_B"))
    # Every base weight is untouched: only the adapters trained.
    frozen = {k: v for k, v in state.items() if k not in adapters and k != "lm_head.weight"}
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[k], base[k]) for k in base)

    # The registered model is the merged one: W + (alpha / r) B A, a plain Llama.
    net = Llama(JobSpec.from_dict(ckpt["spec"]).model)
    add_lora(net, 4, 8.0, 0.0, ["q_proj", "v_proj", "down_proj"])
    net.load_state_dict(state)
    merged = hf_state_dict(net)
    registered = load_file(tmp_path / "lora" / "model.safetensors")
    assert registered.keys() == base.keys()
    assert all(torch.equal(registered[k], merged[k]) for k in merged)
    for k in merged:
        adapted = k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))
        assert torch.equal(registered[k], base[k]) != adapted, k

    # Its ONNX graph gives the merged PyTorch model's logits.
    model, cfg = load_pretrained(tmp_path / "lora")
    ids = np.array([[5, 9, 2, 14, 3, 7, 11, 1]], dtype=np.int64)
    with torch.no_grad():
        expected, _ = model.eval()(torch.from_numpy(ids), last_only=True)
    sess = ort.InferenceSession(
        str(tmp_path / "lora" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    logits, _ = run(sess, cfg, ids, [ids.shape[1]], empty(cfg, 1))
    assert np.abs(logits - expected.numpy()).max() < 1e-4


def test_lora_settings_are_checked_and_counted_before_training(api, tiny_shakespeare):
    dataset_id, base = tiny_shakespeare[0].dataset_id, tiny_shakespeare[0].model_id
    for fields, expected in (
        ({"lora_rank": 4}, "spec.training.lora_rank: LoRA adapts an existing model"),
        ({"lora_rank": 4, "init_from": base, "lora_targets": "q_proj,wq"}, "training.lora_targets"),
        ({"lora_rank": 2000, "init_from": base}, "training.lora_rank: must be between 0 and 1024"),
        ({"lora_rank": 4, "init_from": base, "lora_dropout": 1.0}, "training.lora_dropout"),
    ):
        code, details = _abort_code(lambda f=fields: api.create(dataset_id, **f))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in details, details
    api.wait_terminal(tiny_shakespeare[0].id)
    req = S.CreateJobRequest(
        dataset_id=dataset_id,
        spec=S.JobSpec(
            training=common_pb2.TrainingSpec(init_from=base, lora_rank=8, lora_targets="o_proj")
        ),
        validate_only=True,
    )
    answer = api.jobs.CreateJob(req)
    r = answer.validation
    assert r.trainable_parameters == 2 * 8 * (32 + 32) == answer.parameters.trainable
    assert r.optimizer_bytes == 12 * r.trainable_parameters
    assert answer.spec.training.lora_alpha == 16.0  # the default
    # Frozen weights need no weight gradients: 4N + 6 N_trainable, not 6N, per token.
    m, t = answer.spec.model, answer.spec.training
    n = m.n_layers * (4 * m.d_model**2 + 3 * m.d_model * m.intermediate_size)
    n += m.vocab_size * m.d_model
    attention = 12 * m.n_layers * m.d_model * m.context_length
    assert answer.parameters.flops_per_token == 4 * n + 6 * r.trainable_parameters + attention
    tokens = t.batch_size * t.grad_accum_steps * m.context_length * t.max_steps
    assert r.training_flops == answer.parameters.flops_per_token * tokens
