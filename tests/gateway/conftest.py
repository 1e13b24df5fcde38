"""A whole stack with the HTTP gateway and every /metrics endpoint on free ports, shared by
the gateway tests (OpenAI SDK, metrics, browser)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import SMALL_CORPUS, Api, make_settings

from lmforge_server.stack import Stack

FREE = "127.0.0.1:0"
# Two tenants: the gateway passes each caller's key through to the gRPC servers.
ALICE, BOB = "key-alice", "key-bob"
KEYS = {ALICE: "alice", BOB: "bob"}
AUTH = {"Authorization": f"Bearer {ALICE}"}


@pytest.fixture(scope="session")
def gateway_stack(request, tmp_path_factory) -> Iterator[Stack]:
    # A worker only when a slow gateway test was selected (they train a model, or drive a
    # job through the console): the fast ones never train, and a worker's start (Celery,
    # torch and ONNX preloaded) is seconds of CPU taken from the tests running meanwhile.
    here = Path(__file__).parent
    worker = any(
        here in item.path.parents and item.get_closest_marker("slow")
        for item in request.session.items
    )
    settings = make_settings(
        tmp_path_factory.mktemp("gateway"),
        http_addr=FREE,
        api_metrics_addr=FREE,
        inference_metrics_addr=FREE,
        worker_metrics_addr=FREE,
        api_keys=KEYS,
        max_upload_bytes=1 << 20,
    )
    with Stack(settings, http=True, worker=worker) as stack:
        yield stack


@pytest.fixture(scope="session")
def base_url(gateway_stack) -> str:
    return f"http://{gateway_stack.settings.http_addr}"


@pytest.fixture(scope="session")
def gateway_api(gateway_stack) -> Iterator[Api]:
    with grpc.insecure_channel(gateway_stack.api_addr) as channel:
        yield Api(channel, metadata=[("authorization", f"Bearer {ALICE}")])


def pytest_collection_modifyitems(items):
    # A test that needs the trained model pays for a training run and an export: slow.
    for item in items:
        if "trained_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def trained_model(gateway_api) -> str:
    """A tiny model trained over gRPC: its "name@version"."""
    ds = gateway_api.upload(SMALL_CORPUS.encode(), name="gateway-corpus")
    job = gateway_api.create(ds.id, model_name="gw", max_steps=20, eval_interval=10)
    job = gateway_api.wait_terminal(job.id)
    assert job.state == 4, job  # SUCCEEDED
    return "gw@1"


def scrape(addr: str) -> dict[str, float]:
    """A /metrics page as {'name{labels}': value}, samples only."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
