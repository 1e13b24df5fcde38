"""Generated code matches protos/ (it is never edited by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import genproto  # noqa: E402


def test_generated_code_is_not_stale():
    assert genproto.stale_files() == []


def test_every_service_is_in_the_contract():
    from lmforge.v1 import inference_pb2, training_pb2

    services = set(training_pb2.DESCRIPTOR.services_by_name) | set(
        inference_pb2.DESCRIPTOR.services_by_name
    )
    assert services == {"DatasetService", "JobService", "ModelService", "InferenceService"}
