"""A CUDA provider that cannot load (no GPU, or CUDA libraries missing) must not leave the
server on a graph the CPU cannot run: it serves the fp32 graph on the CPU, and says so."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
from _tiny_models import build_model_dir

from lmforge_server.inference.engine import CPU_EP, CUDA_EP, OrtModel, gpu_present


@pytest.mark.skipif(
    CUDA_EP not in ort.get_available_providers() or gpu_present(),
    reason="needs onnxruntime-gpu on a machine where its CUDA provider cannot load",
)
def test_a_cuda_provider_that_fails_to_load_serves_the_fp32_graph_on_the_cpu(tmp_path, caplog):
    path = build_model_dir(tmp_path / "char", weight_scale=50.0, context_length=96)
    # Stands in for the fp16 export: only which file gets loaded matters here.
    shutil.copyfile(path / "model.onnx", path / "model_fp16.onnx")
    model = OrtModel(path, providers=[CUDA_EP, CPU_EP])
    assert model.provider == CPU_EP and model.dtype == "fp32" and not model.io_binding
    assert "the CUDA provider did not load" in caplog.text
    past = model.empty_past(1)
    assert past[0].dtype.name == "float32"
    ids = np.array([model.encode("ROMEO")[:1]], np.int64)
    one = np.ones((1, 1), np.int64)
    logits, _ = model.run(ids, one, one - 1, past)
    assert logits.shape == (1, model.vocab_size)
