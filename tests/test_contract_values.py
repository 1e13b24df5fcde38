"""Fields of the training API checked by value: each against what it must be (the lr
schedule at that step, the best evaluation, the recorded parity, the formula), so a field
the API forgets to fill, or fills under a renamed key, fails here instead of reading 0.

One tiny job on the session stack is trained once and read by every test of the module.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from conftest import SMALL_CORPUS, job_scratch, model_dir, unique

from lmforge.v1 import training_pb2 as S
from lmforge_worker.training import lr_at

MAX_STEPS, EVAL_INTERVAL = 40, 10


def _progress(events):
    return [e.progress for e in events if e.type == S.JOB_EVENT_TYPE_PROGRESS]


def _evals(events):
    return [e.progress for e in events if e.type == S.JOB_EVENT_TYPE_EVAL]


def _ts(t) -> float:
    return t.seconds + t.nanos / 1e9


@pytest.fixture(scope="module")
def run(api, stack):
    """A finished 40-step job on an ASCII corpus of its own: its dataset, job, events, model."""
    text = SMALL_CORPUS[:30_000] + f"\n{unique('values')}\n"
    assert text.isascii()
    before = time.time()
    dataset = api.upload(text.encode(), name="values-corpus")
    uploaded = time.time()
    name = unique("values")
    job = api.create(
        dataset.id,
        model_name=name,
        request_id=unique("req"),
        max_steps=MAX_STEPS,
        warmup_steps=10,
        learning_rate=4e-3,
        min_learning_rate=4e-4,
        log_interval=1,
        eval_interval=EVAL_INTERVAL,
        checkpoint_interval=20,
    )
    events = api.events(job.id)
    assert events[-1].state == S.JOB_STATE_SUCCEEDED, events[-1].message
    done = api.get(job.id)
    model = api.models.GetModel(S.GetModelRequest(id=done.model_id))
    return SimpleNamespace(
        text=text,
        window=(before, uploaded),
        dataset=dataset,
        created=job,
        job=done,
        events=events,
        model=model,
        name=name,
        model_dir=model_dir(stack, done.model_id),
        job_dir=job_scratch(stack, done.id),
    )


@pytest.mark.slow
def test_progress_fields_by_value(run):
    t = run.job.spec.training
    assert (t.max_steps, t.warmup_steps, t.log_interval) == (MAX_STEPS, 10, 1)
    m = run.job.spec.model
    tokens_per_step = t.batch_size * t.grad_accum_steps * m.context_length
    progress = _progress(run.events)
    assert [p.step for p in progress] == list(range(1, MAX_STEPS + 1))
    assert all(e.job_id == run.job.id for e in run.events)
    elapsed = 0.0
    for p in progress:
        assert p.total_steps == MAX_STEPS
        # The rate the optimizer used for this step (0-based step - 1): warmup, then cosine.
        assert p.learning_rate == pytest.approx(lr_at(p.step - 1, t), rel=1e-5), p.step
        assert p.tokens_seen == p.step * tokens_per_step
        assert p.tokens_per_second > 0 and math.isfinite(p.loss) and p.loss > 0
        # eta = seconds per step (from the same window as tokens/s) x steps left.
        want_eta = tokens_per_step / p.tokens_per_second * (MAX_STEPS - p.step)
        assert p.eta_seconds == pytest.approx(want_eta, rel=1e-3, abs=1e-6), p.step
        assert p.elapsed_seconds >= elapsed and p.elapsed_seconds > 0
        elapsed = p.elapsed_seconds
    assert progress[-1].eta_seconds == 0
    # The warmup's first step, its peak and the cosine's end are not the same rate.
    assert progress[0].learning_rate < progress[9].learning_rate
    assert progress[-1].learning_rate < progress[10].learning_rate

    evals = _evals(run.events)
    assert [e.step for e in evals] == list(range(EVAL_INTERVAL, MAX_STEPS + 1, EVAL_INTERVAL))
    best = (math.inf, 0)
    for e in evals:
        best = min(best, (e.val_loss, e.step))
        assert (e.best_val_loss, e.best_step) == pytest.approx(best, rel=1e-6)
        # A char tokenizer on ASCII text: one byte per token, so bits/byte = nats/token / ln 2.
        assert e.val_bits_per_byte == pytest.approx(e.val_loss / math.log(2), rel=1e-5)

    final = run.job.progress
    assert (final.step, final.total_steps) == (MAX_STEPS, MAX_STEPS)
    assert final.learning_rate == pytest.approx(lr_at(MAX_STEPS - 1, t), rel=1e-5)
    assert final.tokens_seen == MAX_STEPS * tokens_per_step
    assert final.elapsed_seconds >= progress[-1].elapsed_seconds
    assert (final.val_loss, final.val_bits_per_byte) == (
        evals[-1].val_loss,
        evals[-1].val_bits_per_byte,
    )
    assert (final.best_val_loss, final.best_step) == pytest.approx(best, rel=1e-6)


@pytest.mark.slow
def test_model_fields_by_value(run):
    model, job = run.model, run.job
    meta = json.loads((run.model_dir / "metadata.json").read_text())
    evals = _evals(run.events)
    best = min(evals, key=lambda e: e.val_loss)
    assert model.id == job.model_id and model.job_id == job.id
    assert (model.owner, model.name, model.version) == ("default", run.name, 1)
    assert model.state == S.MODEL_STATE_READY
    assert model.val_loss == pytest.approx(best.val_loss, rel=1e-6)
    assert model.val_bits_per_byte == pytest.approx(best.val_bits_per_byte, rel=1e-6)
    assert model.val_loss == pytest.approx(job.progress.best_val_loss, rel=1e-6)
    parity = meta["onnx"]["max_abs_diff"]
    assert model.onnx_parity_max_abs_diff == pytest.approx(parity, rel=1e-6) and parity > 0
    assert model.tokenizer == "char" == job.spec.model.tokenizer
    assert model.context_length == job.spec.model.context_length == 32  # the tiny preset's
    assert model.vocab_size == run.dataset.num_distinct_chars + 1  # the characters + end of text
    assert model.vocab_size == job.spec.model.vocab_size == meta["tokenizer"]["vocab_size"]
    assert list(model.files) == sorted(p.name for p in run.model_dir.iterdir())
    assert {"model.onnx", "model.safetensors", "config.json", "tokenizer.json"} <= set(model.files)
    assert model.dataset_sha256 == run.dataset.sha256
    assert model.parameters == job.parameters and model.spec == job.spec.model
    assert _ts(job.created_at) <= _ts(model.created_at) + 1e-3
    assert _ts(model.created_at) <= _ts(job.finished_at)


@pytest.mark.slow
def test_dataset_and_job_fields_by_value(api, run):
    ds, data = run.dataset, run.text.encode()
    assert ds.id == ds.sha256 == hashlib.sha256(data).hexdigest()
    assert (ds.owner, ds.name, ds.size_bytes) == ("default", "values-corpus", len(data))
    assert ds.num_chars == len(run.text) and ds.num_distinct_chars == len(set(run.text))
    assert run.window[0] - 1 <= _ts(ds.created_at) <= run.window[1] + 1
    assert api.datasets.GetDataset(S.GetDatasetRequest(id=ds.id)) == ds

    job, created = run.job, run.created
    assert (job.id, job.owner, job.dataset_id, job.model_name) == (
        created.id,
        "default",
        ds.id,
        run.name,
    )
    assert job.request_id == created.request_id != ""
    assert (job.attempt, job.error, job.device) == (1, "", "cpu")
    assert job.state == S.JOB_STATE_SUCCEEDED and job.spec == created.spec
    states = {e.state: _ts(e.time) for e in run.events if e.type == S.JOB_EVENT_TYPE_STATE}
    # Each timestamp is the time of its state's event (same clock, same moment).
    assert _ts(job.created_at) == pytest.approx(states[S.JOB_STATE_QUEUED], abs=1.0)
    assert _ts(job.started_at) == pytest.approx(states[S.JOB_STATE_RUNNING], abs=1.0)
    assert _ts(job.finished_at) == pytest.approx(states[S.JOB_STATE_SUCCEEDED], abs=1.0)
    assert _ts(job.created_at) <= _ts(job.started_at) <= _ts(job.finished_at)


@pytest.mark.slow
def test_the_exported_model_is_the_best_evaluations_weights(api, run, stack):
    """A run whose last evaluation is not its best exports the best one's weights."""
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    # From the trained model, a learning rate rising far too high: every step does harm, so
    # the first evaluation is the best and the last is not.
    job = api.create(
        run.dataset.id,
        init_from=f"{run.name}@1",
        max_steps=4,
        learning_rate=0.5,
        warmup_steps=4,
        eval_interval=1,
        checkpoint_interval=1000,
    )
    done = api.wait_terminal(job.id)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.error
    evals = _evals(api.events(job.id))
    best = min(evals, key=lambda e: e.val_loss)
    if best.step >= 4:  # the premise of this test; a rare run ends on its best evaluation
        pytest.skip(
            f"this run's last evaluation was its best: {[(e.step, e.val_loss) for e in evals]}"
        )
    exported_dir = model_dir(stack, done.model_id)
    meta = json.loads((exported_dir / "metadata.json").read_text())
    assert meta["metrics"]["best_step"] == best.step == done.progress.best_step
    exported = load_file(str(exported_dir / "model.safetensors"))
    job_dir = job_scratch(stack, done.id)
    assert (exported_dir / "model.safetensors").read_bytes() == (
        job_dir / f"attempt-{done.attempt}" / "best.safetensors"
    ).read_bytes()
    # The last step's weights (the final checkpoint) are not what was exported.
    [final] = sorted(job_dir.rglob("*.pt"))[-1:]
    last = torch.load(final, map_location="cpu", weights_only=False)["model"]
    assert any(
        not np.array_equal(exported[k], v.numpy()) for k, v in last.items() if k in exported
    ), "exported the last weights"
    # The ONNX graph carries the best weights: every matrix is an initializer or its
    # transpose (MatMul weights are laid out [in, out]), or a block of columns of one (q, k
    # and v are one product, as are gate and up), by value.
    graph = onnx.load(str(exported_dir / "model.onnx")).graph
    inits = [numpy_helper.to_array(t) for t in graph.initializer]
    for name, w in exported.items():
        if w.ndim == 2:
            assert any(_holds_columns(i, w) or _holds_columns(i, w.T) for i in inits), name


def _holds_columns(init: np.ndarray, m: np.ndarray) -> bool:
    """`m` is `init`, or a block of adjacent columns of it."""
    if init.ndim != 2 or init.shape[0] != m.shape[0] or init.shape[1] < m.shape[1]:
        return False
    width = m.shape[1]
    return any(np.array_equal(init[:, j : j + width], m) for j in range(init.shape[1] - width + 1))


def _preset_counts(V, L, d, heads, kv_heads, T, ff, tied=True):
    """The README's formula, written out: embedding, attention, MLP, norm, FLOPs/token."""
    hd = d // heads
    embedding = V * d * (1 if tied else 2)
    attention = L * (2 * d * d + 2 * d * kv_heads * hd)
    mlp = L * 3 * d * ff
    norm = (2 * L + 1) * d
    flops = 6 * (attention + mlp + V * d) + 12 * L * d * T
    return embedding + attention + mlp + norm, embedding, attention, mlp, norm, flops


def test_presets_parameter_counts_and_flops_by_the_formula(api_only):
    from lmforge_server.stack import BUNDLED_CORPUS

    ds = api_only.upload(BUNDLED_CORPUS.read_bytes(), name="tinyshakespeare.txt")
    assert ds.num_distinct_chars == 65
    small = api_only.create(ds.id, preset="small").parameters
    # The README's figure for the small preset on Tiny Shakespeare.
    assert small.total == 861_568
    assert (small.embedding, small.attention, small.mlp, small.norm) == (8448, 262144, 589824, 1152)
    assert small.flops_per_token == 6 * (262144 + 589824 + 66 * 128) + 12 * 4 * 128 * 64
    for preset, shape in {
        "tiny": (66, 2, 32, 2, 2, 32, 128),
        "small": (66, 4, 128, 4, 4, 64, 384),
        "baby": (66, 6, 384, 6, 6, 256, 1024),
    }.items():
        p = api_only.create(ds.id, preset=preset).parameters
        got = (p.total, p.embedding, p.attention, p.mlp, p.norm, p.flops_per_token)
        assert got == _preset_counts(*shape), preset


def test_upload_size_bytes_mismatch_and_a_second_header_are_invalid_argument(api):
    data = f"some text {unique()}".encode()
    sha = hashlib.sha256(data).hexdigest()
    header = S.UploadDatasetHeader(name="x", sha256=sha, size_bytes=len(data) + 1)

    with pytest.raises(grpc.RpcError) as e:
        api.datasets.UploadDataset(
            iter([S.UploadDatasetRequest(header=header), S.UploadDatasetRequest(chunk=data)])
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == f"size_bytes: header says {len(data) + 1}, received {len(data)}"

    header.size_bytes = len(data)
    twice = [
        S.UploadDatasetRequest(header=header),
        S.UploadDatasetRequest(chunk=data[:4]),
        S.UploadDatasetRequest(header=header),
        S.UploadDatasetRequest(chunk=data[4:]),
    ]
    with pytest.raises(grpc.RpcError) as e:
        api.datasets.UploadDataset(iter(twice))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("header:") and "twice" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        api.datasets.GetDataset(S.GetDatasetRequest(id=sha))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was stored


@pytest.mark.parametrize("server", ["api", "inference"])
def test_reflection_lists_the_services(stack, server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    addr = stack.api_addr if server == "api" else stack.inference_addr
    want = {
        "api": {"lmforge.v1.DatasetService", "lmforge.v1.JobService", "lmforge.v1.ModelService"},
        "inference": {"lmforge.v1.InferenceService"},
    }[server] | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    with grpc.insecure_channel(addr) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [resp] = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        listed = {s.name for s in resp.list_services_response.service}
        assert listed == want
        # And each of ours is described, so grpcurl needs no proto files.
        for name in want - {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}:
            [d] = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)]),
                timeout=10,
            )
            assert d.file_descriptor_response.file_descriptor_proto, name


# ---------------------------------------------------------------- an API of their own
# Tests that fill listings or count versions get a stack without a worker (jobs stay QUEUED,
# their model versions TRAINING): nothing trains, and the session stack's lists stay theirs.


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory):
    from conftest import make_settings

    from lmforge_server.stack import Stack

    keys = {"key-alice": "alice", "key-bob": "bob"}
    settings = make_settings(tmp_path_factory.mktemp("values-api"), api_keys=keys)
    with Stack(settings, inference=False, worker=False) as s:
        yield s


@pytest.fixture(scope="module")
def api_channel_own(keyed_stack):
    with grpc.insecure_channel(keyed_stack.api_addr) as channel:
        yield channel


@pytest.fixture(scope="module")
def api_only(api_channel_own):
    from conftest import Api

    return Api(api_channel_own, [("authorization", "Bearer key-alice")])


@pytest.fixture(scope="module")
def bob(api_channel_own):
    from conftest import Api

    return Api(api_channel_own, [("authorization", "Bearer key-bob")])


def _all_pages(call, request_type, field: str, page_size: int, **filters) -> list:
    out, token = [], ""
    while True:
        page = call(request_type(page_size=page_size, page_token=token, **filters))
        items = list(getattr(page, field))
        assert len(items) <= page_size
        out += items
        token = page.next_page_token
        if not token:
            return out
        assert items, "a page token after an empty page"


def test_paging_with_small_pages_gives_the_full_list_once(api_only):
    md = api_only.metadata
    ds_ids, job_ids = [], []
    for i in range(7):
        ds = api_only.upload(f"paging corpus {i} {unique()}\n".encode(), name=f"page-{i}")
        ds_ids.append(ds.id)
    for i in range(9):
        job = api_only.create(ds_ids[i % 3], model_name=f"pager-{i % 2}", max_steps=5)
        job_ids.append(job.id)
        if i % 3 == 0:
            api_only.jobs.CancelJob(S.CancelJobRequest(id=job.id), metadata=md)

    listings = [
        (api_only.datasets.ListDatasets, S.ListDatasetsRequest, "datasets", {}),
        (api_only.jobs.ListJobs, S.ListJobsRequest, "jobs", {}),
        (api_only.jobs.ListJobs, S.ListJobsRequest, "jobs", {"state": S.JOB_STATE_CANCELLED}),
        (api_only.jobs.ListJobs, S.ListJobsRequest, "jobs", {"state": S.JOB_STATE_QUEUED}),
        (api_only.models.ListModels, S.ListModelsRequest, "models", {}),
        (api_only.models.ListModels, S.ListModelsRequest, "models", {"name": "pager-1"}),
    ]
    for rpc, req, field, filters in listings:

        def call(r, rpc=rpc):
            return rpc(r, metadata=md, timeout=10)

        full = [x.id for x in _all_pages(call, req, field, 1000, **filters)]
        assert len(full) == len(set(full)) and full, (field, filters)
        for size in (1, 2, 3, 4):
            paged = [x.id for x in _all_pages(call, req, field, size, **filters)]
            assert paged == full, (field, filters, size)

    listed = _all_pages(
        lambda r: api_only.jobs.ListJobs(r, metadata=md), S.ListJobsRequest, "jobs", 1000
    )
    assert {j.id for j in listed} >= set(job_ids)
    cancelled = {job_ids[i] for i in range(0, 9, 3)}
    by_state = _all_pages(
        lambda r: api_only.jobs.ListJobs(r, metadata=md),
        S.ListJobsRequest,
        "jobs",
        2,
        state=S.JOB_STATE_CANCELLED,
    )
    assert {j.id for j in by_state} == cancelled
    assert all(j.state == S.JOB_STATE_CANCELLED for j in by_state)
    named = _all_pages(
        lambda r: api_only.models.ListModels(r, metadata=md),
        S.ListModelsRequest,
        "models",
        2,
        name="pager-1",
    )
    assert [m.version for m in named] == [4, 3, 2, 1]  # newest first
    assert all(m.name == "pager-1" for m in named)
    assert {
        d.id
        for d in _all_pages(
            lambda r: api_only.datasets.ListDatasets(r, metadata=md),
            S.ListDatasetsRequest,
            "datasets",
            2,
        )
    } >= set(ds_ids)


def test_model_versions_count_up_per_owner_and_name(api_only, bob):
    ds = api_only.upload(f"versions {unique()}\n".encode())
    name = unique("poet")
    first = api_only.create(ds.id, model_name=name)
    second = api_only.create(ds.id, model_name=name)
    other = api_only.create(ds.id, model_name=unique("other"))
    ds_bob = bob.upload(f"versions of bob {unique()}\n".encode())
    bobs = bob.create(ds_bob.id, model_name=name)

    def get(who, ref):
        return who.models.GetModel(S.GetModelRequest(id=ref), metadata=who.metadata, timeout=10)

    assert [get(api_only, j.model_id).version for j in (first, second, other)] == [1, 2, 1]
    assert get(bob, bobs.model_id).version == 1  # bob's own count, not alice's
    assert get(api_only, f"{name}@2").id == second.model_id
    assert get(api_only, f"{name}@1").id == first.model_id
    # No version READY yet: the bare name is the latest version.
    assert get(api_only, name).id == second.model_id
    assert get(api_only, f"{name}@latest").id == second.model_id
    assert get(bob, name).id == bobs.model_id
    with pytest.raises(grpc.RpcError) as e:
        get(api_only, f"{name}@3")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "3" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        get(bob, first.model_id)  # another owner's id does not exist for bob
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- versions that train


@pytest.mark.slow
def test_a_bare_name_is_the_latest_ready_version_while_the_next_one_trains(api, run, stack):
    from lmforge.v1 import inference_pb2, inference_pb2_grpc

    v2 = api.create(run.dataset.id, model_name=run.name, max_steps=1_000_000)

    def get(ref):
        return api.models.GetModel(S.GetModelRequest(id=ref), timeout=10)

    try:
        assert get(v2.model_id).version == 2
        assert get(f"{run.name}@2").state == S.MODEL_STATE_TRAINING
        for ref in (run.name, f"{run.name}@latest", f"{run.name}@1"):
            assert get(ref).id == run.model.id and get(ref).state == S.MODEL_STATE_READY, ref
        with grpc.insecure_channel(stack.inference_addr) as channel:
            infer = inference_pb2_grpc.InferenceServiceStub(channel)
            sampling = inference_pb2.SamplingParams(max_new_tokens=2, temperature=0)
            done = infer.Generate(
                inference_pb2.GenerateRequest(model=run.name, prompt="RO", sampling=sampling),
                timeout=60,
            )
            assert done.model_id == run.model.id
            info = infer.GetModelInfo(inference_pb2.GetModelInfoRequest(model=run.name), timeout=60)
            assert (info.model_id, info.name, info.version) == (run.model.id, run.name, 1)
            assert (info.context_length, info.vocab_size) == (32, run.model.vocab_size)
            assert info.eos_token_id == run.model.vocab_size - 1 and info.loaded
            with pytest.raises(grpc.RpcError) as e:
                infer.Generate(
                    inference_pb2.GenerateRequest(
                        model=f"{run.name}@2", prompt="RO", sampling=sampling
                    ),
                    timeout=60,
                )
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as e:
            api.models.DeleteModel(S.DeleteModelRequest(id=f"{run.name}@2"))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "training" in e.value.details() and v2.id in e.value.details()
        assert get(f"{run.name}@2").state == S.MODEL_STATE_TRAINING  # still there
    finally:
        api.jobs.CancelJob(S.CancelJobRequest(id=v2.id))
    api.wait_terminal(v2.id, timeout=60)
    assert get(f"{run.name}@2").state == S.MODEL_STATE_ABANDONED
    assert get(run.name).id == run.model.id
    api.models.DeleteModel(S.DeleteModelRequest(id=f"{run.name}@2"))
    with pytest.raises(grpc.RpcError) as e:
        get(f"{run.name}@2")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    listed = api.models.ListModels(S.ListModelsRequest(name=run.name)).models
    assert [m.id for m in listed] == [run.model.id]


@pytest.mark.slow
def test_fine_tuning_starts_from_the_base_models_weights(api, run, stack):
    import numpy as np
    from safetensors.numpy import load_file

    # One step at a learning rate too small to move a weight: what is registered is the base.
    job = api.create(
        run.dataset.id,
        init_from=f"{run.name}@1",
        max_steps=1,
        learning_rate=1e-12,
        min_learning_rate=0.0,
        warmup_steps=0,
        weight_decay=0.0,
        eval_interval=1,
    )
    done = api.wait_terminal(job.id)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.error
    base = load_file(str(run.model_dir / "model.safetensors"))
    tuned_dir = model_dir(stack, done.model_id)
    tuned = load_file(str(tuned_dir / "model.safetensors"))
    assert tuned.keys() == base.keys()
    for name, w in base.items():
        np.testing.assert_allclose(tuned[name], w, atol=1e-6, err_msg=name)


def test_job_spec_echoes_every_field_set_and_the_preset_or_default_for_the_rest(api_only):
    from lmforge.v1 import common_pb2
    from lmforge_server.specs import PRESETS, TrainConfig

    ds = api_only.upload(f"spec echo {unique()} abcdefghij\n".encode())
    model = dict(
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        d_model=48,
        intermediate_size=80,
        context_length=24,
        tokenizer="byte",
        dropout=0.25,
        tie_embeddings=False,
        rope_theta=5000.0,
    )
    training = dict(
        max_steps=77,
        batch_size=5,
        grad_accum_steps=3,
        learning_rate=0.0025,
        min_learning_rate=0.0005,
        warmup_steps=7,
        weight_decay=0.125,
        beta1=0.85,
        beta2=0.975,
        grad_clip=0.5,
        eval_interval=11,
        eval_batches=3,
        val_fraction=0.2,
        checkpoint_interval=13,
        seed=4242,
        precision="fp32",
        compile="off",
        early_stopping_patience=4,
        log_interval=2,
        devices=5,  # divides batch_size; a queued job has one node
        nodes=1,
    )
    spec = S.JobSpec(
        preset="tiny",
        model=common_pb2.ModelSpec(**model),
        training=common_pb2.TrainingSpec(**training),
    )
    job = api_only.jobs.CreateJob(
        S.CreateJobRequest(dataset_id=ds.id, spec=spec), metadata=api_only.metadata, timeout=30
    )
    assert job.spec.preset == "tiny"
    for name, value in model.items():
        assert getattr(job.spec.model, name) == pytest.approx(value), name
    assert job.spec.model.vocab_size == 257  # a byte tokenizer: 256 bytes + end of text
    for name, value in training.items():
        assert getattr(job.spec.training, name) == pytest.approx(value), name
    assert job.spec.training.init_from == ""

    # Nothing set: the preset's values, and the defaults for what the preset leaves out.
    bare = api_only.create(ds.id, preset="small")
    preset = PRESETS["small"]
    for name, value in preset["model"].items():
        assert getattr(bare.spec.model, name) == pytest.approx(value), name
    defaults = TrainConfig(max_steps=1, batch_size=1)
    for f in common_pb2.TrainingSpec.DESCRIPTOR.fields:
        want = preset["training"].get(f.name, getattr(defaults, f.name))
        assert getattr(bare.spec.training, f.name) == pytest.approx(want), f.name
    assert bare.spec.model.intermediate_size == 384  # 8/3 x 128 rounded up to 64
    assert bare.spec.model.n_kv_heads == bare.spec.model.n_heads == 4
    assert api_only.get(job.id).spec == job.spec  # stored as echoed


def test_deleting_a_dataset_removes_it_unless_an_active_job_uses_it(api_only):
    md = api_only.metadata
    ds = api_only.upload(f"to delete {unique()}\n".encode())
    api_only.datasets.DeleteDataset(S.DeleteDatasetRequest(id=ds.id), metadata=md, timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        api_only.datasets.GetDataset(S.GetDatasetRequest(id=ds.id), metadata=md, timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    listed = api_only.datasets.ListDatasets(S.ListDatasetsRequest(page_size=1000), metadata=md)
    assert ds.id not in {d.id for d in listed.datasets}
    with pytest.raises(grpc.RpcError) as e:
        api_only.create(ds.id)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "dataset_id" in e.value.details()


@pytest.mark.slow
def test_cancel_during_export_ends_cancelled_with_no_model_files(api, run, stack):
    # A tiny model exports in a fraction of a second: a job that ended between the look
    # and the cancel is tried again; a cancel accepted (CANCELLING) must always win.
    ends = (S.JOB_STATE_EXPORTING, S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED)
    for _ in range(5):
        job = api.create(run.dataset.id, max_steps=5, eval_interval=5)
        api.wait_for(job.id, lambda j: j.state in ends, timeout=120)
        cancelled = api.jobs.CancelJob(S.CancelJobRequest(id=job.id))
        if cancelled.state == S.JOB_STATE_CANCELLING:
            break
    else:
        pytest.fail("no job was caught exporting in 5 tries")
    done = api.wait_terminal(job.id)
    assert done.state == S.JOB_STATE_CANCELLED, done.error
    events = api.events(job.id)
    assert events[-1].terminal and events[-1].message == "cancelled during export"
    model = api.models.GetModel(S.GetModelRequest(id=done.model_id))
    assert model.state == S.MODEL_STATE_ABANDONED and not model.files
    exported = stack.settings.artifacts_dir / "models" / done.model_id
    assert not exported.exists() or not any(p.is_file() for p in exported.rglob("*"))
