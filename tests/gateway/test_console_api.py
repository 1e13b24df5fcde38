"""The console's JSON/SSE API and `lmforge open`: bad input gets a clear 4xx naming the
field, in the same error shape as the OpenAI endpoints."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from lmforge.cli import main
from lmforge.v1 import training_pb2

from .conftest import AUTH


def call(base_url: str, path: str, body: bytes | None = None, method: str | None = None):
    """(status, content type, body text)."""
    req = urllib.request.Request(f"{base_url}{path}", data=body, method=method, headers=AUTH)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers["content-type"], resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read().decode()


def error_of(text: str) -> dict:
    return json.loads(text)["error"]


def test_bad_console_requests_get_a_4xx_naming_the_field(base_url):
    status, _, text = call(base_url, "/api/jobs?state=SLEEPING")
    assert status == 400 and error_of(text)["param"] == "state"
    assert "RUNNING" in error_of(text)["message"]

    status, _, text = call(base_url, "/api/jobs", b"not json", "POST")
    assert status == 400 and "JSON" in error_of(text)["message"]

    body = json.dumps({"dataset_id": "0" * 64, "training": {"max_stepz": 3}}).encode()
    status, _, text = call(base_url, "/api/jobs", body, "POST")
    assert status == 400 and "max_stepz" in error_of(text)["message"]

    body = json.dumps({"dataset_id": "0" * 64, "preset": "tiny"}).encode()
    status, _, text = call(base_url, "/api/jobs", body, "POST")
    assert status == 404 and "0000" in error_of(text)["message"]

    body = json.dumps({"model": "nope@3", "prompt": "x"}).encode()
    status, _, text = call(base_url, "/api/generate", body, "POST")
    assert status == 404 and error_of(text)["type"] == "not_found_error"

    status, _, text = call(base_url, "/api/jobs/job_nope/cancel", b"", "POST")
    assert status == 404


def test_upload_over_the_limit_is_413_and_stores_nothing(base_url):
    status, _, text = call(base_url, "/api/datasets?name=big", b"a" * ((1 << 20) + 1), "POST")
    assert status == 413 and "limit of 1048576 bytes" in error_of(text)["message"]
    status, _, text = call(base_url, "/api/datasets")
    assert "big" not in [d["name"] for d in json.loads(text)["datasets"]]


def test_watching_an_unknown_job_ends_its_event_stream_with_an_error_event(base_url):
    status, ctype, text = call(base_url, "/api/jobs/job_nope/events")
    assert status == 200 and ctype.startswith("text/event-stream")
    assert text.startswith("event: error\n")
    data = json.loads(text.split("data: ", 1)[1])
    assert data["status"] == 404 and "job_nope" in data["error"]["message"]


def test_watching_a_finished_job_replays_every_event_then_ends(
    base_url, gateway_api, trained_model
):
    listed = gateway_api.jobs.ListJobs(
        training_pb2.ListJobsRequest(page_size=100), metadata=gateway_api.metadata
    )
    (job,) = [j for j in listed.jobs if j.model_name == "gw"]
    status, _, text = call(base_url, f"/api/jobs/{job.id}/events")
    events = [e for e in text.split("\n\n") if e]
    assert status == 200 and events[-1] == "event: end\ndata: {}"
    first = json.loads(events[0].split("data: ", 1)[1])
    assert first["state"] == "JOB_STATE_QUEUED" and events[0].startswith(f"id: {first['id']}\n")
    last = json.loads(events[-2].split("data: ", 1)[1])
    assert last["terminal"] and last["state"] == "JOB_STATE_SUCCEEDED"


def test_lmforge_open_prints_the_console_url(gateway_stack, capsys):
    with pytest.raises(SystemExit) as e:
        main(["open", "--print", "--http", gateway_stack.settings.http_addr])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"http://{gateway_stack.settings.http_addr}/\n"
    with pytest.raises(SystemExit) as e:
        main(["open", "--print", "--http", "127.0.0.1:1"])
    assert e.value.code == 1
    assert "no console answering at http://127.0.0.1:1/" in capsys.readouterr().err
