"""The CUDA paths: mixed-precision training, fused AdamW, torch.compile, the fp16 ONNX graph,
the CUDA execution provider with IO binding, and a whole job through the service on a GPU.

Every test here is marked `gpu`; conftest skips them, saying why, where CUDA is missing (CI).
`python bench/gpu.py` runs them on a GPU machine and puts the outcome in its report.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from _tiny_models import CORPUS, build_cycle_model_dir, tiny_config
from conftest import SMALL_CORPUS, Api, make_settings, model_dir
from test_training import Recorder, tiny_spec

from lmforge.v1 import inference_pb2, inference_pb2_grpc, training_pb2
from lmforge_server.inference.engine import CUDA_EP, Engine, OrtModel, choose_providers
from lmforge_server.inference.resolver import DirectoryResolver
from lmforge_server.inference.sampling import SamplingParams
from lmforge_server.settings import Settings
from lmforge_server.stack import Stack
from lmforge_worker.export import export_onnx
from lmforge_worker.model import Llama
from lmforge_worker.training import (
    _autocast,
    _configure_optimizer,
    finalize,
    load_checkpoint,
    resolve_precision,
    train,
)

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
TEXT = CORPUS[:30000]
# Bytes of 4 characters of 1, 2, 3 and 4 bytes; the cycle model emits them in a loop.
CYCLE = "añ€😀".encode()
CYCLE_TEXT = CYCLE.decode()


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def needs_ort_cuda() -> None:
    import onnxruntime as ort

    if CUDA_EP not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider (needs onnxruntime-gpu)")


def needs_bf16() -> None:
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip(f"{torch.cuda.get_device_name()} has no native bf16")


def batch(vocab: int, seed: int = 0, shape=(4, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (shape[0], shape[1] + 1), generator=g).to(CUDA)
    return rows[:, :-1], rows[:, 1:]


def losses(hooks: Recorder) -> list[float]:
    return [p.loss for p in hooks.progress]


# --- training -------------------------------------------------------------------------------


def test_bf16_autocast_computes_in_bf16_keeps_fp32_weights_and_learns(tmp_path, corpus):
    needs_bf16()
    assert resolve_precision("auto", CUDA) == "bf16"
    model = Llama(tiny_config(vocab_size=64)).to(CUDA)
    x, _ = batch(64)
    with _autocast(CUDA, "bf16"):
        logits, _ = model(x)
    assert logits.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    hooks = Recorder()
    spec = tiny_spec(precision="bf16", compile="off")
    result = train(spec, corpus, tmp_path / "work", tmp_path / "ckpt", hooks, device="cuda")
    assert "on cuda (bf16)" in hooks.logs[0], hooks.logs[0]
    assert result.status == "completed" and result.steps == spec.training.max_steps
    assert math.isfinite(result.best_val_loss)
    assert losses(hooks)[-1] < losses(hooks)[0] - 0.5, losses(hooks)


def test_fp16_autocast_trains_through_the_grad_scaler(tmp_path, corpus):
    model = Llama(tiny_config(vocab_size=64)).to(CUDA)
    x, _ = batch(64)
    with _autocast(CUDA, "fp16"):
        logits, _ = model(x)
    assert logits.dtype == torch.float16

    hooks = Recorder()
    spec = tiny_spec(precision="fp16", compile="off")
    result = train(spec, corpus, tmp_path / "work", tmp_path / "ckpt", hooks, device="cuda")
    assert "on cuda (fp16)" in hooks.logs[0], hooks.logs[0]
    assert result.status == "completed"
    assert losses(hooks)[-1] < losses(hooks)[0] - 0.5, losses(hooks)
    # The scaler ran (an fp32/bf16 run saves an empty state) and its scale stayed usable.
    scaler = load_checkpoint(hooks.checkpoints[-1][1])["scaler"]
    assert scaler and 1.0 <= scaler["scale"] <= 65536.0, scaler


def test_a_cpu_attempt_resumes_on_the_gpu_in_fp16(tmp_path, corpus):
    # The first attempt trained in fp32 with the scaler off (a CPU worker); the GPU worker that
    # resumes its checkpoint runs fp16 with the scaler on and a fused optimizer.
    spec = tiny_spec(precision="fp16", compile="off")
    first = Recorder(stop_at=20, reason="shutdown")
    r1 = train(spec, corpus, tmp_path / "work", tmp_path / "a1", first, device="cpu")
    assert r1.status == "interrupted"
    second = Recorder()
    r2 = train(
        spec,
        corpus,
        tmp_path / "work",
        tmp_path / "a2",
        second,
        device="cuda",
        resume_from=first.checkpoints[-1][1],
    )
    assert r2.status == "completed" and r2.steps == spec.training.max_steps
    assert second.progress[0].step > r1.steps
    assert math.isfinite(r2.best_val_loss)


def test_fused_adamw_on_cuda_matches_the_plain_update(tmp_path):
    t = tiny_spec().training
    torch.manual_seed(0)
    model = Llama(tiny_config(vocab_size=64)).to(CUDA)
    ref = copy.deepcopy(model)
    fused = _configure_optimizer(model, t, CUDA)
    plain = _configure_optimizer(ref, t, torch.device("cpu"))  # the same groups, fused=False
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(5):
        x, y = batch(64, seed=step)
        for m, opt in ((model, fused), (ref, plain)):
            m.loss(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    worst = max(
        (a - b).abs().max().item()
        for a, b in zip(model.parameters(), ref.parameters(), strict=True)
    )
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), start, strict=True))
    assert worst < 1e-5 < moved, (worst, moved)


def test_compile_on_and_off_reach_the_same_loss(tmp_path, corpus):
    runs = {}
    for mode in ("off", "on"):
        hooks = Recorder()
        spec = tiny_spec(precision="fp32", compile=mode)
        result = train(
            spec, corpus, tmp_path / mode, tmp_path / f"{mode}-ckpt", hooks, device="cuda"
        )
        runs[mode] = (result, hooks)
    assert "compiled" in runs["on"][1].logs[0] and "compiled" not in runs["off"][1].logs[0]
    (off, off_hooks), (on, on_hooks) = runs["off"], runs["on"]
    # Same seed, data and init; only the kernels differ (fusion, reduction order).
    assert losses(on_hooks)[0] == pytest.approx(losses(off_hooks)[0], abs=1e-3)
    assert on.final_loss == pytest.approx(off.final_loss, abs=2e-2)
    assert on.best_val_loss == pytest.approx(off.best_val_loss, abs=2e-2)


# --- export and inference -------------------------------------------------------------------


def test_fp16_onnx_export_matches_pytorch_on_the_cuda_provider(tmp_path, corpus):
    needs_ort_cuda()
    hooks = Recorder()
    spec = tiny_spec(compile="off")
    result = train(spec, corpus, tmp_path / "work", tmp_path / "ckpt", hooks, device="cuda")
    out = finalize(result, spec, tmp_path / "work", tmp_path / "model", {})
    facts = export_onnx(out, fp16=True)
    half = facts["files"]["model_fp16.onnx"]
    assert half["dtype"] == "fp16" and (out / "model_fp16.onnx").is_file()
    parity = half["parity"]
    assert parity.get("provider") == CUDA_EP, parity
    # fp16 keeps ~3 significant digits; a trained tiny model's logits are a few units.
    assert parity["max_abs_logit_diff"] < 5e-2, parity
    assert facts["max_abs_diff"] < 1e-4  # the fp32 graph, checked on the CPU as always


def test_cuda_provider_keeps_the_cache_on_the_gpu_with_io_binding(tmp_path):
    needs_ort_cuda()
    path = build_cycle_model_dir(tmp_path / "models" / "cyc", CYCLE, context_length=512)
    m = OrtModel(path, providers=choose_providers("cuda"))
    assert m.provider == CUDA_EP and m.device == "cuda"
    cache = m.new_cache(2)
    assert all(b.is_cuda for b in cache.buffers)
    logits = m.run(cache, np.array([[CYCLE[0]]], np.int64), [0], 1)
    tokens = [int(logits[0].argmax())]
    for step in range(1, 12):
        logits = m.run(cache, np.array([[tokens[-1]]], np.int64), [step], 1)
        tokens.append(int(logits[0].argmax()))
    assert bytes(tokens) == (CYCLE * 4)[1:13]

    async def streams():
        engine = Engine(
            Settings(inference_device="cuda", max_batch_size=16), DirectoryResolver(path.parent)
        )
        params = SamplingParams(max_new_tokens=40, temperature=0)
        # Prompts of different lengths join one batch mid-flight, each in its own cache slot.
        prompts = [CYCLE_TEXT[: 1 + i % 4] for i in range(16)]
        done = await asyncio.gather(
            *[engine.complete("default", "cyc", p, params) for p in prompts]
        )
        info = await engine.model_info("default", "cyc")
        await engine.close()
        return prompts, done, info

    prompts, done, info = asyncio.run(streams())
    assert info.execution_provider == CUDA_EP
    for prompt, d in zip(prompts, done, strict=True):
        start = CYCLE.index(prompt.encode()[-1:]) + 1
        assert bytes(d.token_ids) == (CYCLE * 20)[start : start + 40], prompt


def test_a_job_trains_on_the_gpu_and_serves_on_cuda_through_the_service(tmp_path):
    needs_ort_cuda()
    settings = make_settings(tmp_path / "data", device="cuda", inference_device="cuda")
    with Stack(settings) as stack, grpc.insecure_channel(stack.api_addr) as channel:
        api = Api(channel)
        ds = api.upload(SMALL_CORPUS.encode(), name="shakespeare-60k")
        job = api.create(ds.id, model_name="gpu-tiny", max_steps=60)
        events = api.events(job.id)
        done = api.get(job.id)
        assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
        assert done.device.startswith("cuda"), done.device
        logs = [e.message for e in events if e.type == training_pb2.JOB_EVENT_TYPE_LOG]
        assert any(" on cuda (" in m for m in logs), logs
        model = api.models.GetModel(training_pb2.GetModelRequest(id="gpu-tiny@latest"))
        assert {"model.onnx", "model_fp16.onnx"} <= set(model.files)
        meta_path = model_dir(stack, model.id) / "metadata.json"
        fp16 = json.loads(meta_path.read_text())["onnx"]["files"]["model_fp16.onnx"]
        assert fp16["parity"].get("provider") == CUDA_EP, fp16

        with grpc.insecure_channel(stack.inference_addr) as ich:
            stub = inference_pb2_grpc.InferenceServiceStub(ich)
            reply = stub.Generate(
                inference_pb2.GenerateRequest(
                    model="gpu-tiny",
                    prompt="ROMEO:",
                    sampling=inference_pb2.SamplingParams(max_new_tokens=20, temperature=0),
                ),
                timeout=120,
            )
            info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(model="gpu-tiny"))
    assert info.execution_provider == CUDA_EP and info.dtype == "fp16", info
    assert reply.usage.completion_tokens == len(reply.token_ids) > 0
    assert reply.finish_reason in (
        inference_pb2.FINISH_REASON_LENGTH,
        inference_pb2.FINISH_REASON_EOS,
    )
