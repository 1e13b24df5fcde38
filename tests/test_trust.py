"""A service other services can trust (issue 8), over real gRPC servers and a real Redis:
no UNKNOWN for bad bytes or values, scopes, tenant names, the init_from allow-list, watches
that end and are capped, UNAVAILABLE when Redis is down, DeleteJob, tenant isolation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import pytest
from conftest import SMALL_CORPUS, Api, make_settings

from lmforge.v1 import inference_pb2, training_pb2, training_pb2_grpc
from lmforge_server import store as st
from lmforge_server.auth import KeyConfigError, Keyring, parse_entry, read_key_file
from lmforge_server.stack import Stack

S = training_pb2
KEYS = {
    "k-alice": "alice",
    "k-bob": "bob",
    "k-reader": "alice:read",
    "k-infer": "alice:infer",
    "k-trainer": "alice:train+read",
}


def md(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def trust(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    (root / "base").mkdir()
    settings = make_settings(
        root,
        api_keys=KEYS,
        base_model_dirs=[str(root / "base")],
        max_watches_per_owner=3,
        requeue_stalled_after_s=3600,
    )
    with Stack(settings, worker=False) as s:
        with (
            grpc.insecure_channel(s.api_addr) as api_ch,
            grpc.insecure_channel(s.inference_addr) as inf_ch,
        ):
            s.api_ch, s.inf_ch = api_ch, inf_ch
            s.alice = Api(api_ch, md("k-alice"))
            s.bob = Api(api_ch, md("k-bob"))
            s.dataset = s.alice.upload(SMALL_CORPUS[:3000].encode(), name="alice-data")
            s.root = root
            yield s


def code_of(call, *args, **kw) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def raw(channel, method: str, payload: bytes, key: str = "k-alice", stream=False):
    """Calls `method` with raw bytes (identity serializers): no client-side validation."""
    kw = dict(request_serializer=None, response_deserializer=None)
    if stream:
        call = channel.unary_stream(method, **kw)
        return lambda: list(call(payload, metadata=md(key), timeout=10))
    return lambda: channel.unary_unary(method, **kw)(payload, metadata=md(key), timeout=10)


# ---------------------------------------------------------------- bytes and values


def test_request_bytes_that_are_not_a_protobuf_are_invalid_argument(trust):
    garbage = b"\xff\xff\xff\xff\x0f"  # a truncated varint: no message parses from it
    cases = [
        (trust.api_ch, "/lmforge.v1.JobService/GetJob", False),
        (trust.api_ch, "/lmforge.v1.JobService/CreateJob", False),
        (trust.api_ch, "/lmforge.v1.JobService/WatchJob", True),
        (trust.api_ch, "/lmforge.v1.ModelService/ListModels", False),
        (trust.api_ch, "/lmforge.v1.DatasetService/GetDataset", False),
        (trust.inf_ch, "/lmforge.v1.InferenceService/Generate", False),
        (trust.inf_ch, "/lmforge.v1.InferenceService/GenerateStream", True),
    ]
    for channel, method, stream in cases:
        code, details = code_of(raw(channel, method, garbage, stream=stream))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        assert "protobuf" in details
    # Invalid UTF-8 in a string field is also a decoding error.
    code, _ = code_of(raw(trust.api_ch, "/lmforge.v1.JobService/GetJob", b"\x0a\x02\xc3\x28"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_upload_stream_with_an_undecodable_message_is_invalid_argument(trust):
    call = trust.api_ch.stream_unary(
        "/lmforge.v1.DatasetService/UploadDataset",
        request_serializer=None,
        response_deserializer=None,
    )
    code, details = code_of(call, iter([b"\xff\xff\xff"]), metadata=md("k-alice"), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "protobuf" in details


@pytest.mark.parametrize("token", ["o²", "o9999999999999999999", "o" + "7" * 5000, "x1", "o-1"])
def test_page_tokens_we_never_issued_are_invalid_argument(trust, token):
    code, details = code_of(
        trust.alice.jobs.ListJobs, S.ListJobsRequest(page_token=token), metadata=md("k-alice")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in details


@pytest.mark.parametrize(
    "after",
    ["99999999999999999999-0", "١٢٣-0", "1-0\n", "1-", "-1", "1-0-0", "18446744073709551616-0"],
)
def test_after_event_ids_redis_would_reject_are_invalid_argument(trust, after):
    job = trust.alice.create(trust.dataset.id, max_steps=5)
    code, details = code_of(trust.alice.events, job.id, after=after, timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "after_event_id" in details


def test_error_messages_never_echo_a_huge_id(trust):
    code, details = code_of(trust.alice.get, "job_" + "x" * 16_000)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "id: at most" in details
    code, details = code_of(
        trust.alice.models.GetModel, S.GetModelRequest(id="m" * 100), metadata=md("k-alice")
    )
    assert code == grpc.StatusCode.NOT_FOUND and len(details) < 200


# ---------------------------------------------------------------- keys, scopes, tenants


def test_scopes_limit_what_a_key_may_do(trust):
    ds = trust.dataset.id
    reader, infer, trainer = (
        Api(trust.api_ch, md(k)) for k in ("k-reader", "k-infer", "k-trainer")
    )
    job = trust.alice.create(ds, max_steps=5)
    # read: look, never change.
    assert reader.get(job.id).id == job.id
    code, details = code_of(reader.create, ds)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'train'" in details
    code, details = code_of(
        reader.models.DeleteModel, S.DeleteModelRequest(id=job.model_id), metadata=reader.metadata
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'train'" in details
    # infer: generate only; it cannot start jobs, read them or delete models.
    for call in (
        lambda: infer.create(ds),
        lambda: infer.get(job.id),
        lambda: infer.jobs.CancelJob(S.CancelJobRequest(id=job.id), metadata=infer.metadata),
    ):
        code, details = code_of(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
    gen = trust.inf_ch.unary_unary(
        "/lmforge.v1.InferenceService/Generate",
        request_serializer=inference_pb2.GenerateRequest.SerializeToString,
        response_deserializer=inference_pb2.GenerateResponse.FromString,
    )
    request = inference_pb2.GenerateRequest(model="nope", prompt="x")
    assert code_of(gen, request, metadata=md("k-infer"), timeout=10)[0] == grpc.StatusCode.NOT_FOUND
    code, details = code_of(gen, request, metadata=md("k-reader"), timeout=10)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'infer'" in details
    # train+read: everything but generating.
    assert trainer.create(ds, max_steps=5).owner == "alice"
    # The job ids of one tenant are shared by all of its keys.
    assert trainer.get(job.id).owner == "alice"


def test_tenant_names_that_could_collide_in_redis_keys_are_refused():
    for entry in ("k:a:b", "k:a/b:read", "k:-x", "k:" + "t" * 65, "k:a b", "k:alice:write"):
        key, _, rest = entry.partition(":")
        with pytest.raises(KeyConfigError):
            Keyring.from_settings(make_settings("/tmp", api_keys={key: rest}))
    assert parse_entry("k:a.b_c-1:read+infer", "x")[1].scopes == {"read", "infer"}


def test_key_file_holds_keys_tenants_and_scopes(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team keys\nsk-1:acme\n\nsk-2:acme:read,infer\n")
    keys = read_key_file(path)
    assert keys["sk-1"].tenant == "acme" and keys["sk-1"].scopes == {"read", "train", "infer"}
    assert keys["sk-2"].scopes == {"read", "infer"}
    path.write_text("sk-3:a:b\n")
    with pytest.raises(KeyConfigError, match="keys:1"):
        read_key_file(path)


def test_a_tenant_named_with_a_separator_cannot_start_a_server(tmp_path):
    env = {**os.environ, **make_settings(tmp_path, api_keys={"k": "a:b"}).to_env()}
    env["LMFORGE_REDIS_URL"] = "redis://127.0.0.1:1"
    out = subprocess.run(
        [sys.executable, "-m", "lmforge_server.launch", "api"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "scopes" in out.stderr  # "a:b" = tenant a, scope "b"


def test_a_server_refuses_a_public_address_without_keys(tmp_path):
    env = {**os.environ, **make_settings(tmp_path, api_addr="0.0.0.0:0").to_env()}
    env["LMFORGE_REDIS_URL"] = "redis://127.0.0.1:1"
    for role in ("api", "inference"):
        out = subprocess.run(
            [sys.executable, "-m", "lmforge_server.launch", role],
            env={**env, "LMFORGE_INFERENCE_ADDR": "0.0.0.0:0"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0, role
        assert "refusing to serve 0.0.0.0:0 without API keys" in out.stderr, out.stderr[-2000:]
        assert "--allow-unauthenticated" in out.stderr


# ---------------------------------------------------------------- init_from


def _llama_dir(path, **config):
    path.mkdir(parents=True, exist_ok=True)
    base = dict(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=259,
        max_position_embeddings=64,
    )
    (path / "config.json").write_text(json.dumps({**base, **config}))
    (path / "tokenizer.json").write_text("{}")
    return path


def test_init_from_refuses_paths_outside_the_allow_list_revealing_nothing(trust, tmp_path):
    bob = trust.bob
    # Another tenant's model directory under the artifact store, by every spelling.
    theirs = _llama_dir(trust.settings.artifacts_dir / "models" / "mdl_alice")
    outside = _llama_dir(tmp_path / "outside")
    inside = trust.root / "base"
    (inside / "escape").symlink_to(outside)
    bob_ds = bob.upload(SMALL_CORPUS[:3000].encode())
    refs = [
        str(theirs),
        f"file://{theirs}",
        f"file://{theirs.relative_to('/')}",
        f"/proc/self/cwd/{theirs}",
        str(outside),
        f"{inside}/../../{tmp_path.name}/outside",
        str(inside / "escape"),
        str(trust.settings.artifacts_dir),
        "/etc",
        "/definitely/not/here",
        "../models/mdl_alice",
    ]
    messages = set()
    for ref in refs:
        code, details = code_of(bob.create, bob_ds.id, init_from=ref)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (ref, code, details)
        messages.add(details)
    assert len(messages) == 1, messages  # the same words whether the path exists or not
    assert "init_from" in messages.pop()


@pytest.mark.parametrize(
    "config, field",
    [
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(hidden_size=[1, 2]), "config.json"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(num_hidden_layers=200), "model.n_layers"),
        (dict(vocab_size=None), "config.json"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_a_malformed_base_config_is_invalid_argument_naming_the_field(trust, config, field):
    path = _llama_dir(trust.root / "base" / f"bad-{abs(hash(json.dumps(config)))}", **config)
    code, details = code_of(trust.alice.create, trust.dataset.id, init_from=str(path))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("spec.training.init_from") and field in details, details


def test_a_base_config_that_is_not_an_object_is_invalid_argument(trust):
    path = _llama_dir(trust.root / "base" / "list")
    (path / "config.json").write_text("[1, 2]")
    code, details = code_of(trust.alice.create, trust.dataset.id, init_from=str(path))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "JSON object" in details


# ---------------------------------------------------------------- watch


def test_watch_of_a_terminal_job_after_its_last_event_ends(trust):
    job = trust.alice.create(trust.dataset.id, max_steps=5)
    trust.alice.jobs.CancelJob(S.CancelJobRequest(id=job.id), metadata=trust.alice.metadata)
    events = trust.alice.events(job.id, timeout=10)
    assert events[-1].terminal
    # Resuming at the last event, or past it, ends at once instead of hanging.
    assert trust.alice.events(job.id, after=events[-1].id, timeout=10) == []
    assert trust.alice.events(job.id, after="99999999999999-0", timeout=10) == []


@pytest.mark.parametrize(
    "ending",
    ["cancel", pytest.param("deadline", marks=pytest.mark.slow)],  # waits 5 s
)
def test_open_watches_are_capped_per_owner(trust, ending):
    job = trust.alice.create(trust.dataset.id, max_steps=5)
    # "deadline": each watch ends at its deadline, which the server enforces itself.
    timeout = 5 if ending == "deadline" else 60
    streams = [
        trust.alice.jobs.WatchJob(
            S.WatchJobRequest(id=job.id), metadata=trust.alice.metadata, timeout=timeout
        )
        for _ in range(3)
    ]
    for s in streams:
        next(s)  # each is open and has delivered the "job created" event
    code, details = code_of(trust.alice.events, job.id, timeout=10)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit per owner is 3" in details
    # Another owner is not affected.
    bob_job = trust.bob.create(trust.bob.upload(b"bob's text " * 50).id, max_steps=5)
    bobs = trust.bob.jobs.WatchJob(
        S.WatchJobRequest(id=bob_job.id), metadata=trust.bob.metadata, timeout=10
    )
    assert next(bobs).type == S.JOB_EVENT_TYPE_STATE  # admitted: the "job created" event
    bobs.cancel()
    # A watch that has ended gives its slot back.
    for s in streams:
        if ending == "cancel":
            s.cancel()
        with pytest.raises(grpc.RpcError) as e:
            list(s)
        expected = {
            "cancel": grpc.StatusCode.CANCELLED,
            "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
        }
        assert e.value.code() == expected[ending]
    assert _admitted_within(trust, job.id, 15)


def _admitted_within(trust, job_id: str, seconds: float) -> bool:
    """A new watch of alice's gets in (and delivers the first event) within `seconds`; the
    server may take a moment to see the end of a watch, so RESOURCE_EXHAUSTED is retried."""
    deadline = time.monotonic() + seconds
    while True:
        new = trust.alice.jobs.WatchJob(
            S.WatchJobRequest(id=job_id), metadata=trust.alice.metadata, timeout=2
        )
        try:
            return next(new).job_id == job_id
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        finally:
            new.cancel()  # a cancelled watch gives its slot back at once (tested below)


# A client that ends a watch: cancels it, closes its channel, or dies (the kernel closes
# its TCP connection). Each leaves the server with an idle watch to end.
_DYING_WATCHER = """
import sys, time, grpc
from lmforge.v1 import training_pb2, training_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
jobs = training_pb2_grpc.JobServiceStub(channel)
request = training_pb2.WatchJobRequest(id=sys.argv[2])
stream = jobs.WatchJob(request, metadata=(("authorization", "Bearer k-alice"),), timeout=120)
next(stream)
print("open", flush=True)
time.sleep(120)
"""


def _open_then_end_a_watch(trust, job_id: str, how: str) -> None:
    if how == "killed":
        proc = subprocess.Popen(
            [sys.executable, "-c", _DYING_WATCHER, trust.api_addr, job_id],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout.readline().strip() == "open"
        finally:
            proc.kill()
            proc.wait()
        return
    channel = grpc.insecure_channel(trust.api_addr)
    jobs = training_pb2_grpc.JobServiceStub(channel)
    stream = jobs.WatchJob(S.WatchJobRequest(id=job_id), metadata=trust.alice.metadata, timeout=120)
    next(stream)
    if how == "cancelled":
        stream.cancel()
    channel.close()  # "closed": the channel goes with the stream still open


def test_a_cancelled_closed_or_killed_watch_gives_its_slot_back(trust):
    """A watch's end reaches the server however the client ends it, and frees its slot;
    before the fix a cancel that landed while the handler sent an XREAD was lost and the
    idle watch kept its slot (forever, on a job with no new events)."""
    idle = trust.alice.create(trust.dataset.id, max_steps=5)  # no worker: no new events
    ended = trust.alice.create(trust.dataset.id, max_steps=5)
    trust.alice.jobs.CancelJob(S.CancelJobRequest(id=ended.id), metadata=trust.alice.metadata)
    last = trust.alice.events(ended.id, timeout=10)[-1].id

    def slot_free() -> bool:
        # A watch after an ended job's last event ends at once: it tests for a free slot.
        code, details = code_of(trust.alice.events, ended.id, after=last, timeout=10)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED), details
        return code == grpc.StatusCode.OK

    with grpc.insecure_channel(trust.api_addr) as channel:
        jobs = training_pb2_grpc.JobServiceStub(channel)
        # Two watches hold two of alice's three slots: every round's watch takes the last.
        held = [
            jobs.WatchJob(S.WatchJobRequest(id=idle.id), metadata=trust.alice.metadata, timeout=120)
            for _ in range(2)
        ]
        for s in held:
            next(s)
        try:
            for i, how in enumerate(["cancelled", "closed", "closed"] * 8 + ["killed"] * 2):
                _open_then_end_a_watch(trust, idle.id, how)
                # The server may take a moment to see the end; a lost one never frees.
                deadline = time.monotonic() + 15
                while not slot_free():
                    assert time.monotonic() < deadline, f"round {i}: a {how} watch kept its slot"
                    time.sleep(0.05)
        finally:
            for s in held:
                s.cancel()


# ---------------------------------------------------------------- jobs


def test_delete_job_removes_a_terminal_job_only_and_only_the_owners(trust):
    alice, bob = trust.alice, trust.bob
    job = alice.create(trust.dataset.id, max_steps=5, request_id="del-1")
    delete = alice.jobs.DeleteJob
    code, details = code_of(delete, S.DeleteJobRequest(id=job.id), metadata=alice.metadata)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "cancel" in details
    alice.jobs.CancelJob(S.CancelJobRequest(id=job.id), metadata=alice.metadata)
    code, _ = code_of(delete, S.DeleteJobRequest(id=job.id), metadata=bob.metadata)
    assert code == grpc.StatusCode.NOT_FOUND
    assert alice.get(job.id).state == S.JOB_STATE_CANCELLED
    delete(S.DeleteJobRequest(id=job.id), metadata=alice.metadata)
    assert code_of(alice.get, job.id)[0] == grpc.StatusCode.NOT_FOUND
    assert job.id not in [
        j.id for j in alice.jobs.ListJobs(S.ListJobsRequest(), metadata=alice.metadata).jobs
    ]
    # The request_id is free again: a new request with it makes a new job.
    assert alice.create(trust.dataset.id, max_steps=5, request_id="del-1").id != job.id


def test_tenant_b_never_reaches_tenant_a_objects_by_any_rpc(trust):
    alice, bob = trust.alice, trust.bob
    ds_id = alice.upload(b"only alice has this text " * 40).id
    job = alice.create(ds_id, max_steps=5, model_name="alice-model")
    model_id = job.model_id
    calls = [
        (bob.datasets.GetDataset, S.GetDatasetRequest(id=ds_id)),
        (bob.datasets.DeleteDataset, S.DeleteDatasetRequest(id=ds_id)),
        (bob.jobs.GetJob, S.GetJobRequest(id=job.id)),
        (bob.jobs.CancelJob, S.CancelJobRequest(id=job.id)),
        (bob.jobs.DeleteJob, S.DeleteJobRequest(id=job.id)),
        (bob.models.GetModel, S.GetModelRequest(id=model_id)),
        (bob.models.GetModel, S.GetModelRequest(id="alice-model")),
        (bob.models.DeleteModel, S.DeleteModelRequest(id=model_id)),
        (bob.models.DeleteModel, S.DeleteModelRequest(id="alice-model@1")),
        (bob.datasets.GetDataset, S.GetDatasetRequest(id=f"alice:{ds_id}")),
        (bob.jobs.PauseJob, S.PauseJobRequest(id=job.id)),
        (bob.jobs.ResumeJob, S.ResumeJobRequest(id=job.id)),
        (bob.jobs.ListCheckpoints, S.ListCheckpointsRequest(id=job.id)),
        (lambda r, **kw: list(bob.jobs.GetJobMetrics(r, **kw)), S.GetJobMetricsRequest(id=job.id)),
        (
            lambda r, **kw: list(bob.models.DownloadModel(r, **kw)),
            S.DownloadModelRequest(id=model_id),
        ),
        (bob.jobs.CreateJob, S.CreateJobRequest(dataset_id=ds_id, validate_only=True)),
        (bob.jobs.ExportCheckpoint, S.ExportCheckpointRequest(job_id=job.id, step=5)),
    ]
    for call, request in calls:
        code, details = code_of(call, request, metadata=bob.metadata, timeout=10)
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED), (
            request,
            code,
            details,
        )
    code, _ = code_of(bob.events, job.id, timeout=10)
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(bob.create, ds_id)
    assert code == grpc.StatusCode.NOT_FOUND
    bob_ds = bob.upload(b"b" * 500).id
    code, _ = code_of(bob.create, bob_ds, init_from="alice-model")
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(bob.create, bob_ds, init_from=f"{job.id}:5")  # alice's checkpoint
    assert code == grpc.StatusCode.NOT_FOUND
    request = S.CreateJobRequest(dataset_id=bob_ds, validation_dataset_id=ds_id)
    for validate_only in (True, False):
        request.validate_only = validate_only
        code, details = code_of(bob.jobs.CreateJob, request, metadata=bob.metadata, timeout=10)
        assert code == grpc.StatusCode.NOT_FOUND and "validation_dataset_id" in details
    for listing in (
        bob.jobs.ListJobs(S.ListJobsRequest(), metadata=bob.metadata).jobs,
        bob.models.ListModels(
            S.ListModelsRequest(name="alice-model"), metadata=bob.metadata
        ).models,
    ):
        assert all(x.owner == "bob" for x in listing)
    gen = trust.inf_ch.unary_unary(
        "/lmforge.v1.InferenceService/GetModelInfo",
        request_serializer=inference_pb2.GetModelInfoRequest.SerializeToString,
        response_deserializer=inference_pb2.ModelInfo.FromString,
    )
    code, _ = code_of(gen, inference_pb2.GetModelInfoRequest(model=model_id), metadata=md("k-bob"))
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
    # Alice's objects are intact.
    assert alice.get(job.id).state == S.JOB_STATE_QUEUED
    assert alice.datasets.GetDataset(S.GetDatasetRequest(id=ds_id), metadata=alice.metadata).id
    assert alice.models.GetModel(S.GetModelRequest(id=model_id), metadata=alice.metadata).id


def test_redis_outage_is_unavailable_with_no_internal_detail(tmp_path):
    with Stack(make_settings(tmp_path), inference=False, worker=False) as s:
        with grpc.insecure_channel(s.api_addr) as channel:
            api = Api(channel)
            job = api.create(api.upload(b"some text " * 100).id, max_steps=5)
            port = s.redis.url.rpartition(":")[2].split("/")[0]
            s.redis.stop()
            for call in (lambda: api.get(job.id), lambda: api.create(job.dataset_id)):
                code, details = code_of(call)
                assert code == grpc.StatusCode.UNAVAILABLE, details
                assert port not in details and "redis" not in details.lower()
            code, details = code_of(api.events, job.id, timeout=10)
            assert code == grpc.StatusCode.UNAVAILABLE and port not in details


def test_store_not_found_is_both_a_service_error_and_a_key_error():
    e = st.NotFound("job 'x' not found")
    assert isinstance(e, KeyError) and str(e) == "job 'x' not found"


def test_rpcs_in_flight_are_bounded_per_server(tmp_path):
    settings = make_settings(tmp_path, max_concurrent_rpcs=2)
    with Stack(settings, inference=False, worker=False) as s:
        with grpc.insecure_channel(s.api_addr) as channel:
            api = Api(channel)
            job = api.create(api.upload(b"words " * 100).id, max_steps=5)
            watches = [
                api.jobs.WatchJob(S.WatchJobRequest(id=job.id), timeout=30) for _ in range(2)
            ]
            for w in watches:
                next(w)  # both are open and waiting for the next event
            code, _ = code_of(api.get, job.id)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            for w in watches:
                w.cancel()
            for _ in range(50):
                if code_of(api.get, job.id)[0] == grpc.StatusCode.OK:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the server never took calls again")
