"""The CUDA guards a CPU machine can check: a CUDA provider that cannot load (no GPU, or CUDA
libraries missing) leaves the server on the fp32 graph on the CPU, saying so, not on a graph
the CPU cannot run; compile="auto" compiles only where inductor can (CUDA with Triton)."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _tiny_models import build_model_dir

from lmforge_server.inference.engine import CPU_EP, CUDA_EP, OrtModel, gpu_present
from lmforge_worker.training import use_compile


@pytest.mark.skipif(
    CUDA_EP not in ort.get_available_providers() or gpu_present(),
    reason="needs onnxruntime-gpu on a machine where its CUDA provider cannot load",
)
def test_a_cuda_provider_that_fails_to_load_serves_the_fp32_graph_on_the_cpu(tmp_path, caplog):
    path = build_model_dir(tmp_path / "char", weight_scale=50.0, context_length=96)
    # Stands in for the fp16 export: only which file gets loaded matters here.
    shutil.copyfile(path / "model.onnx", path / "model_fp16.onnx")
    model = OrtModel(path, providers=[CUDA_EP, CPU_EP])
    assert model.provider == CPU_EP and model.dtype == "fp32"
    assert "the CUDA provider did not load" in caplog.text
    cache = model.new_cache(1)
    assert cache.dtype.name == "float32"
    ids = np.array([model.encode("ROMEO")[:1]], np.int64)
    logits = model.run(cache, ids, [0])
    assert logits.shape == (1, model.vocab_size)


def test_compile_follows_on_and_off_and_auto_stays_eager_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_compile("on", cpu) and not use_compile("off", cuda)
    assert not use_compile("auto", cpu)


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="Triton is installed")
def test_compile_auto_on_cuda_without_triton_stays_eager():
    # Inductor needs Triton for CUDA; without it compile would fail at the first step.
    assert not use_compile("auto", torch.device("cuda"))
