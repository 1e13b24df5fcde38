"""The service's artifacts in each store backend: a directory and S3 (moto's server)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import SMALL_CORPUS, make_settings, store_settings

import lmforge
from lmforge_server.artifacts import ArtifactStore
from lmforge_server.stack import Stack


# The directory backend's side of this runs in test_training_service.py on the session's
# stack (model files, deletion); here S3, on a stack of its own.
# A whole stack that trains, exports and serves over S3: about 9 CPU seconds. The fast
# subset keeps the store's own tests (test_objectstore.py) and an upload to S3 (test_api.py).
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["s3"])
def test_datasets_and_models_are_published_in_the_store_and_leave_it_when_deleted(
    request, tmp_path, backend
):
    settings = make_settings(tmp_path, keep_scratch=False, **store_settings(request, backend))
    with (
        Stack(settings) as stack,
        lmforge.Client(api_addr=stack.api_addr, inference_addr=stack.inference_addr) as client,
    ):
        store = ArtifactStore.from_settings(stack.settings).objects
        corpus = SMALL_CORPUS[:20_000].encode()
        dataset = client.datasets.upload(corpus, name="store")
        [data] = store.open_manifest(f"datasets/default/{dataset.id}").files
        assert (data.name, data.size, data.sha256) == ("data.txt", len(corpus), dataset.sha256)

        job = client.jobs.create(dataset=dataset, preset="tiny", training={"max_steps": 10})
        done = client.jobs.wait(job.id, timeout=300)
        assert done.state == "SUCCEEDED", done.error
        model = client.models.get(done.model_id)
        published = store.open_manifest(f"models/{model.id}/attempt-{done.attempt}")
        assert sorted(f.name for f in published.files) == sorted(model.files)
        assert {"model.onnx", "model.safetensors", "config.json", "tokenizer.json"} <= set(
            model.files
        )
        # The job's resume point is in the store too.
        [checkpoint] = [o for o in store.list(f"jobs/{job.id}") if o.key.endswith(".pt")]
        assert "/step-00000010/" in checkpoint.key
        # The worker's local work for the job is gone once the attempt ended (it is all in
        # the store); the job's end is written just before the worker removes it.
        scratch = tmp_path / "scratch" / "jobs" / job.id
        deadline = time.monotonic() + 60
        while _files(scratch) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _files(scratch) == []
        out = client.generate(model.id, "ROMEO:", max_tokens=8, temperature=0.0)
        assert out.usage.completion_tokens >= 1

        client.models.delete(model.id)
        assert store.list(f"models/{model.id}") == []
        client.datasets.delete(dataset.id)
        assert store.list(f"datasets/default/{dataset.id}") == []


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]
