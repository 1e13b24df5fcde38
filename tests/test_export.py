"""ONNX export: one GroupQueryAttention graph that ONNX Runtime runs with PyTorch's numerics
(its cache concatenated here; the slot cache the server binds is tested in test_kv_cache.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lmforge_server.specs import ModelConfig
from lmforge_worker.export import ParityError, export_onnx, input_names, output_names
from lmforge_worker.graph import cache_head_dim
from lmforge_worker.model import Llama, save_pretrained

CONFIGS = {
    "mha-tied": dict(n_layers=2, n_heads=4, n_kv_heads=4, d_model=32, tie_embeddings=True),
    "gqa-untied": dict(n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, tie_embeddings=False),
    "mqa-3-layers": dict(n_layers=3, n_heads=2, n_kv_heads=1, d_model=48, tie_embeddings=True),
}


def make_model_dir(path, seed=0, **fields):
    cfg = ModelConfig(
        intermediate_size=64, context_length=64, vocab_size=70, tokenizer="char", **fields
    )
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    save_pretrained(model, path)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_model_dir(path, **CONFIGS[request.param])
    facts = export_onnx(path)
    sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    return path, model, facts, sess


def run(sess, cfg, ids, lens, past):
    """`ids` [B, S] (right-padded: row b has lens[b] real tokens after the past's P)."""
    feeds = {
        "input_ids": ids,
        "seqlens_k": np.asarray(lens, np.int32) - 1,
        "total_sequence_length": np.array(max(lens), np.int32),
    }
    feeds.update(zip(input_names(cfg.n_layers)[3:], past, strict=True))
    out = sess.run(None, feeds)
    return out[0], out[1:]


def empty(cfg, batch):
    shape = (batch, cfg.n_kv_heads, 0, cache_head_dim(cfg.head_dim))
    return [np.zeros(shape, np.float32)] * (2 * cfg.n_layers)


@pytest.mark.slow
def test_graph_passes_the_checker_and_loads_in_onnxruntime(exported):
    path, model, facts, _ = exported
    proto = onnx.load(str(path / "model.onnx"))
    onnx.checker.check_model(proto)
    assert proto.ir_version <= 13
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    n = model.config.n_layers
    assert [i.name for i in proto.graph.input] == input_names(n)
    assert [o.name for o in proto.graph.output] == output_names(n)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in proto.graph.input
    }
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["seqlens_k"] == ["batch"] and dims["total_sequence_length"] == []
    assert dims["past_key_values.0.key"] == [
        "batch",
        model.config.n_kv_heads,
        "past",
        cache_head_dim(model.config.head_dim),
    ]
    assert facts["max_abs_diff"] <= 1e-4
    json.dumps(facts)  # goes into metadata.json as is
    assert not [p for p in path.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.slow
@torch.no_grad()
def test_prefill_and_decode_match_pytorch(exported):
    _, model, facts, sess = exported
    cfg = model.config
    parity = facts["files"]["model.onnx"]["parity"]
    assert parity["decode_steps"] == 32 and parity["greedy_tokens_match"]
    # Independently of the exporter's own check: a prompt, then 32 greedy steps.
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    t_logits, t_past = model(ids, last_only=True)
    o_logits, past = run(sess, cfg, ids.numpy(), [9], empty(cfg, 1))
    assert o_logits.shape == (1, 1, cfg.vocab_size)
    worst = np.abs(o_logits - t_logits.numpy()).max()
    for _ in range(32):
        nxt = t_logits[:, -1].argmax(-1, keepdim=True)
        assert int(o_logits[0, -1].argmax()) == int(nxt)
        n = past[0].shape[2] + 1
        t_logits, t_past = model(nxt, past_key_values=t_past)
        o_logits, past = run(sess, cfg, nxt.numpy(), [n], past)
        worst = max(worst, np.abs(o_logits - t_logits.numpy()).max())
        assert past[0].shape[2] == n
    assert worst <= 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_right_padded_prefill_gives_each_row_its_own_logits(exported):
    _, model, _, sess = exported
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (1, n), generator=g) for n in (3, 7)]
    ids = np.zeros((2, 7), np.int64)
    for r, p in enumerate(prompts):
        ids[r, : p.shape[1]] = p.numpy()
    logits, _ = run(sess, cfg, ids, [3, 7], empty(cfg, 2))
    for r, p in enumerate(prompts):
        assert np.abs(logits[r, -1] - model(p, last_only=True)[0][0, -1].numpy()).max() <= 1e-4


@pytest.mark.slow
def test_fp16_graph_is_written_beside_the_fp32_one(tmp_path):
    make_model_dir(tmp_path, **CONFIGS["gqa-untied"])
    facts = export_onnx(tmp_path, fp16=True)
    half = facts["files"]["model_fp16.onnx"]
    assert half["dtype"] == "fp16" and (tmp_path / "model_fp16.onnx").is_file()
    sess = ort.InferenceSession(
        str(tmp_path / "model_fp16.onnx"), providers=["CPUExecutionProvider"]
    )
    assert sess.get_inputs()[3].type == "tensor(float16)"
    assert sess.get_outputs()[0].type == "tensor(float)"
    assert facts["fp16_max_abs_diff"] is None or facts["fp16_max_abs_diff"] < 0.05


@pytest.mark.slow
def test_failed_parity_raises_and_leaves_nothing_behind(tmp_path):
    make_model_dir(tmp_path, **CONFIGS["mha-tied"])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ParityError, match="parity"):
        export_onnx(tmp_path, parity_limit=-1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_unknown_exporter_is_refused(tmp_path):
    make_model_dir(tmp_path, **CONFIGS["gqa-untied"])
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(tmp_path, exporter="magic")
