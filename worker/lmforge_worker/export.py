"""ONNX export with a KV cache, and the PyTorch <-> ONNX Runtime parity check.

The graph (names as onnxruntime-genai uses them):
  inputs   input_ids [batch, seq] int64, attention_mask [batch, total] int64 (1 real, 0 left
           padding; total = past + seq), position_ids [batch, seq] int64,
           past_key_values.<i>.key / .value [batch, n_kv, past, head_dim] float
  outputs  logits [batch, 1, vocab] (last position only; float32 even in the fp16 graph),
           present.<i>.key / .value [batch, n_kv, past + seq, head_dim]
Prefill passes an empty past (past = 0).

Beside the fp32 graph, quantised variants of it (`VARIANTS`): int8 and int4, weight-only
MatMulNBits with 8- and 4-bit weights in blocks of 32 and int8 compute. Each is checked like fp32 (parity, recorded not enforced) and scored on the
job's validation tokens (teacher-forced through the graph's own KV cache); one whose loss
is more than QUALITY_GATE above fp32's is marked as failing the gate, and the server never
serves it by default. The facts land in `variants.json` beside the graphs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge_worker.model import Llama, load_pretrained

OPSET = 18
# ONNX Runtime 1.31 loads IR version <= 13; onnx 1.23 writes 14 by default.
MAX_IR_VERSION = 10
FP32_PARITY_LIMIT = 1e-4
PARITY_PROMPT_TOKENS = 16
PARITY_DECODE_STEPS = 32
VARIANTS = ("int8", "int4")
# A quantised graph may lose at most this fraction of fp32's validation loss to be served.
QUALITY_GATE = 0.01
EVAL_WINDOWS, EVAL_LENGTH = 8, 64
QUANT_BLOCK_SIZE = 32


class ParityError(RuntimeError):
    """ONNX Runtime's logits differ from PyTorch's by more than the limit."""

    def __init__(self, max_abs_diff: float, limit: float):
        super().__init__(
            f"ONNX export parity check failed: max |logit difference| {max_abs_diff:.3g} "
            f"exceeds {limit:g} (PyTorch vs ONNX Runtime, fp32)"
        )
        self.max_abs_diff = max_abs_diff
        self.limit = limit


def input_names(n_layers: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(n_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(n_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


class _KVGraph(nn.Module):
    """The model with a flat signature: what the exporters trace."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = [(past_flat[i], past_flat[i + 1]) for i in range(0, len(past_flat), 2)]
        logits, presents = self.model(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past,
            last_only=True,
        )
        flat = [t for kv in presents for t in kv]
        return (logits.float(), *flat)


# Attention as the exported graph computes it. torch's exporter decomposes
# scaled_dot_product_attention into Transpose(K) -> Mul(sqrt(scale)) -> MatMul, which copies
# and rescales the whole key cache every decode step (ONNX Runtime cannot fuse the transpose
# through the Mul): 18% + 4.5% of a batch-16 step with a 128-token cache (10.7M model, CPU).
# Scaling the (one-row) queries instead leaves Transpose -> MatMul, which ORT fuses into one
# FusedMatMul(transB) that reads the cache in place. Same maths; parity is checked as before.
_export_local = threading.local()
_patch_lock = threading.Lock()
_patch_depth = 0
_sdpa = F.scaled_dot_product_attention


def _sdpa_for_export(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    plain = is_causal or dropout_p or kw or attn_mask is None or not attn_mask.is_floating_point()
    if plain or not getattr(_export_local, "active", False):
        return _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-2, -1)) + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


@contextlib.contextmanager
def _export_attention():
    """Routes this thread's scaled_dot_product_attention calls to `_sdpa_for_export`
    (other threads, e.g. training, keep torch's own)."""
    global _patch_depth
    with _patch_lock:
        _patch_depth += 1
        F.scaled_dot_product_attention = _sdpa_for_export
    _export_local.active = True
    try:
        yield
    finally:
        _export_local.active = False
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                F.scaled_dot_product_attention = _sdpa


def _example_inputs(model: Llama, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    # Dynamic dims must not be 0 or 1 in the example (the exporter would specialise them).
    cfg = model.config
    B, S, P = 2, 3, 4
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    mask = torch.ones(B, P + S, dtype=torch.int64)
    pos = torch.arange(P, P + S).unsqueeze(0).expand(B, S).contiguous()
    past = [
        torch.randn(B, cfg.n_kv_heads, P, cfg.head_dim, dtype=dtype)
        for _ in range(2 * cfg.n_layers)
    ]
    return (ids, mask, pos, *past)


def _export_dynamo(graph: _KVGraph, example, path: Path, n_layers: int) -> None:
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    shapes: list[Any] = [{0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}]
    # *past_flat is one positional group: its shapes go in one nested list.
    shapes.append(tuple([{0: batch, 2: past}] * (2 * n_layers)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            graph,
            tuple(example),
            dynamic_shapes=tuple(shapes),
            input_names=input_names(n_layers),
            output_names=output_names(n_layers),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    prog.optimize()
    prog.save(str(path), external_data=False)


def _export_legacy(graph: _KVGraph, example, path: Path, n_layers: int) -> None:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch"},
    }
    for i in range(n_layers):
        for kind in ("key", "value"):
            axes[f"past_key_values.{i}.{kind}"] = {0: "batch", 2: "past"}
            axes[f"present.{i}.{kind}"] = {0: "batch", 2: "past_seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            tuple(example),
            str(path),
            input_names=input_names(n_layers),
            output_names=output_names(n_layers),
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


# Exporter, by measurement (torch 2.13 CPU, 10.8M-parameter model, 2 cores, ORT 1.31):
#   legacy (TorchScript): export 1.2 s, 950 nodes, decode 1.67 ms/token (batch 1), 3.84 (batch 8)
#   dynamo (torch.export): export 7.9 s, 428 nodes, decode 1.62 ms/token (batch 1), 3.53 (batch 8)
# Runtime is equal within noise (dynamo a few % ahead) and export runs once per trained
# model, so we take dynamo: the compact graph, static logits shape [batch, 1, vocab], and
# the exporter torch keeps developing (the legacy one is deprecated). "legacy" stays
# selectable for models dynamo cannot trace.
DEFAULT_EXPORTER = "dynamo"
_EXPORTERS = {"dynamo": _export_dynamo, "legacy": _export_legacy}


def _write_json(path: Path, data: Any) -> None:
    import json

    tmp = _tmp_beside(path)
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")


def _session(path: Path, providers: list[str] | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


def _fp16_providers() -> list[str]:
    """Where the fp16 graph is checked: the CUDA provider when this machine has one (the
    CPU provider lacks fp16 kernels), else the CPU."""
    from lmforge_server.inference.engine import choose_providers

    return choose_providers("auto")


def _feeds(cfg, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> dict:
    P, S = past[0].shape[2], ids.shape[1]
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, P : P + S]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos.astype(np.int64)}
    for name, t in zip(input_names(cfg.n_layers)[3:], past, strict=True):
        feeds[name] = t
    return feeds


@torch.no_grad()
def check_parity(
    model: Llama,
    onnx_path: Path,
    *,
    dtype: np.dtype = np.float32,
    prompt_tokens: int = PARITY_PROMPT_TOKENS,
    decode_steps: int = PARITY_DECODE_STEPS,
    seed: int = 0,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    """Max |logit difference| between the PyTorch model (fp32) and ONNX Runtime (CPU, or
    `providers`).

    Runs a random prompt, then `decode_steps` greedy steps, each side with its own KV
    cache and both fed PyTorch's greedy token. Also reports whether the greedy tokens
    agree (ORT's argmax vs PyTorch's) at every step.
    """
    cfg = model.config
    model = model.float().eval()
    sess = _session(onnx_path, providers)
    g = torch.Generator().manual_seed(seed)
    n = max(1, min(prompt_tokens, cfg.context_length - decode_steps - 1))
    steps = max(0, min(decode_steps, cfg.context_length - n))
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=g)
    past = [np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), dtype)] * (2 * cfg.n_layers)
    mask = np.ones((1, n), np.int64)

    t_logits, t_past = model(ids, last_only=True)
    out = sess.run(None, _feeds(cfg, ids.numpy(), mask, past))
    prefill = float(np.abs(out[0].astype(np.float32) - t_logits.numpy()).max())
    decode, tokens_match = 0.0, True
    for _ in range(steps):
        nxt = t_logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens_match &= int(out[0][0, -1].argmax()) == int(nxt)
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        t_logits, t_past = model(nxt, past_key_values=t_past)
        out = sess.run(None, _feeds(cfg, nxt.numpy(), mask, list(out[1:])))
        decode = max(decode, float(np.abs(out[0].astype(np.float32) - t_logits.numpy()).max()))
    return {
        "max_abs_logit_diff": max(prefill, decode),
        "prefill_max_abs_diff": prefill,
        "decode_max_abs_diff": decode,
        "prompt_tokens": n,
        "decode_steps": steps,
        "greedy_tokens_match": bool(tokens_match),
        "provider": sess.get_providers()[0],
    }


def _export_one(model: Llama, target: Path, *, dtype: torch.dtype, exporter: str) -> dict:
    """Exports to a temporary file beside `target`, checks it, returns its path and facts."""
    import onnx

    cfg = model.config
    tmp = _tmp_beside(target)
    try:
        started = time.perf_counter()
        graph = _KVGraph(model.to(dtype).eval())
        with torch.no_grad(), _export_attention():
            _EXPORTERS[exporter](graph, _example_inputs(model, dtype), tmp, cfg.n_layers)
        proto = onnx.load(str(tmp))
        if proto.ir_version > MAX_IR_VERSION:
            proto.ir_version = MAX_IR_VERSION
            onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        facts = {
            "file": target.name,
            "exporter": exporter,
            "export_seconds": round(time.perf_counter() - started, 3),
            "opset": opset,
            "ir_version": proto.ir_version,
            "dtype": "fp16" if dtype == torch.float16 else "fp32",
            "bytes": tmp.stat().st_size,
        }
        return {"tmp": tmp, **facts}
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fold_weight_transposes(proto) -> None:
    """MatMul(x, Transpose(W)) with W an initializer -> MatMul(x, W^T), W^T an initializer.

    A tied lm_head reads the embedding through a Transpose; the quantiser only quantises a
    MatMul with a constant weight, so without this the largest matrix (the output
    projection) would stay fp32. The embedding keeps its fp32 copy for the Gather.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    folded = set()
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        w = numpy_helper.to_array(inits[t.input[0]])
        name = f"{t.input[0]}_transposed"
        if name not in inits:
            arr = np.ascontiguousarray(w.transpose(perm) if perm else w.T)
            inits[name] = numpy_helper.from_array(arr, name)
            proto.graph.initializer.append(inits[name])
        node.input[1] = name
        folded.add(t.output[0])
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    dead = [
        n
        for n in proto.graph.node
        if n.op_type == "Transpose" and n.output[0] in folded and n.output[0] not in used
    ]
    for n in dead:
        proto.graph.node.remove(n)


def quantize(src: Path, dst: Path, variant: str) -> None:
    """Writes the `variant` ("int8" or "int4") of the fp32 graph `src` to `dst`."""
    import logging

    import onnx

    if variant in ("int8", "int4"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        proto = onnx.load(str(src))
        _fold_weight_transposes(proto)

        # accuracy_level 4: activations quantised to int8 per row and block inside the
        # kernel (the fast CPU path), so a row's result never depends on the rest of the
        # batch (dynamic per-tensor int8 quantisation would make batching change tokens).
        q = MatMulNBitsQuantizer(
            proto,
            bits=8 if variant == "int8" else 4,
            block_size=QUANT_BLOCK_SIZE,
            is_symmetric=True,
            accuracy_level=4,
        )
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
    else:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    proto = onnx.load(str(dst))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        onnx.save(proto, str(dst))


def eval_windows(tokens: np.ndarray, context_length: int) -> np.ndarray:
    """Up to EVAL_WINDOWS evenly spaced windows [W, L + 1] of `tokens` for `graph_val_loss`."""
    tokens = np.asarray(tokens, dtype=np.int64)
    length = min(EVAL_LENGTH, context_length - 1, len(tokens) - 1)
    if length < 2:
        raise ValueError(f"need at least 3 evaluation tokens, got {len(tokens)}")
    starts = np.linspace(0, len(tokens) - length - 1, EVAL_WINDOWS).astype(np.int64)
    return np.stack([tokens[s : s + length + 1] for s in np.unique(starts)])


def graph_val_loss(path: Path, cfg, windows: np.ndarray) -> float:
    """Mean next-token loss of the ONNX graph over `windows`, fed one token at a time
    through its own KV cache (the graph emits last-position logits only)."""
    sess = _session(path)
    B, L = windows.shape[0], windows.shape[1] - 1
    past = [np.zeros((B, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.n_layers)
    total = 0.0
    for t in range(L):
        mask = np.ones((B, t + 1), np.int64)
        out = sess.run(None, _feeds(cfg, windows[:, t : t + 1], mask, past))
        past = list(out[1:])
        logits = out[0][:, -1].astype(np.float64)
        m = logits.max(axis=1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        total += float((logz - logits[np.arange(B), windows[:, t + 1]]).sum())
    return total / (B * L)


def decode_ms_per_token(path: Path, cfg, *, steps: int = 32, repeats: int = 3) -> float:
    """Batch-1 greedy decode latency of the graph on this machine's CPU (best of `repeats`)."""
    sess = _session(path)
    # Short contexts (the tiny preset has 32 positions) get fewer steps, never none.
    steps = max(1, min(steps, cfg.context_length // 2))
    n = max(1, min(16, cfg.context_length - steps - 1))
    ids = np.arange(n, dtype=np.int64)[None] % cfg.vocab_size
    best = float("inf")
    for _ in range(repeats):
        past = [np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.n_layers)
        out = sess.run(None, _feeds(cfg, ids, np.ones((1, n), np.int64), past))
        t = time.perf_counter()
        for i in range(steps):
            nxt = out[0][:, -1].argmax(-1)[:, None].astype(np.int64)
            out = sess.run(None, _feeds(cfg, nxt, np.ones((1, n + i + 1), np.int64), out[1:]))
        best = min(best, (time.perf_counter() - t) / steps * 1e3)
    return best


def _score_variants(model: Llama, items: list[dict], eval_tokens) -> None:
    """Adds val_loss, passes_quality_gate and decode_ms_per_token to each variant's facts."""
    cfg = model.config
    windows = None if eval_tokens is None else eval_windows(eval_tokens, cfg.context_length)
    ref = None
    for item in items:
        item["decode_ms_per_token"] = round(decode_ms_per_token(item["tmp"], cfg), 4)
        item["val_loss"] = None if windows is None else graph_val_loss(item["tmp"], cfg, windows)
        if item["variant"] == "fp32":
            ref = item["val_loss"]
            item["passes_quality_gate"] = True
        else:
            # Unmeasured quality fails closed: the variant serves only when asked for.
            ok = ref is not None and item["val_loss"] is not None
            item["passes_quality_gate"] = ok and item["val_loss"] <= ref * (1 + QUALITY_GATE)
            if ok:
                item["val_loss_increase"] = item["val_loss"] / ref - 1


def export_onnx(
    model_dir: Path,
    *,
    fp16: bool = False,
    exporter: str = DEFAULT_EXPORTER,
    parity_limit: float = FP32_PARITY_LIMIT,
    variants: tuple[str, ...] | None = None,
    eval_tokens: np.ndarray | None = None,
) -> dict[str, Any]:
    """Exports the model in `model_dir` to `model_dir/model.onnx` (and `model_fp16.onnx`).

    Each file is written under a temporary name, checked (onnx.checker, IR version, parity
    against PyTorch) and only then renamed into place; on any failure nothing new is left
    in `model_dir`. Returns facts to merge into metadata.json: per file the exporter,
    opset, IR version, export seconds and the parity figures. Raises ParityError when
    the fp32 graph's max |logit difference| exceeds `parity_limit`; the fp16 graph's
    difference is recorded, not enforced (it runs on the CPU only where ORT can).

    `variants` (default: VARIANTS when `eval_tokens` are given, else none) are quantised
    from the fp32 graph (model_<variant>.onnx), scored on `eval_tokens` (the job's
    validation tokens; without them no variant passes the quality gate) and timed;
    `variants.json` lists every graph with those figures.
    """
    model_dir = Path(model_dir)
    if exporter not in _EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(_EXPORTERS)}, got {exporter!r}")
    model, cfg = load_pretrained(model_dir)
    model.eval()
    done: list[dict] = []
    try:
        fp32 = _export_one(model, model_dir / "model.onnx", dtype=torch.float32, exporter=exporter)
        done.append(fp32)
        fp32["parity"] = check_parity(model, fp32["tmp"])
        if fp32["parity"]["max_abs_logit_diff"] > parity_limit:
            raise ParityError(fp32["parity"]["max_abs_logit_diff"], parity_limit)
        fp32["variant"], fp32["passes_quality_gate"] = "fp32", True
        if variants is None:
            variants = VARIANTS if eval_tokens is not None else ()
        scored = [fp32]
        for name in variants:
            target = model_dir / f"model_{name}.onnx"
            tmp = _tmp_beside(target)
            item = {"tmp": tmp, "file": target.name, "variant": name, "dtype": "fp32"}
            done.append(item)
            t = time.perf_counter()
            quantize(fp32["tmp"], tmp, name)
            item["export_seconds"] = round(time.perf_counter() - t, 3)
            item["bytes"] = tmp.stat().st_size
            item["parity"] = check_parity(model, tmp)
            scored.append(item)
        if len(scored) > 1:
            _score_variants(model, scored, eval_tokens)
        if fp16:
            # A copy: casting in place would round the fp32 reference weights.
            half = _export_one(
                copy.deepcopy(model),
                model_dir / "model_fp16.onnx",
                dtype=torch.float16,
                exporter=exporter,
            )
            half["variant"] = "fp16"
            done.append(half)
            try:
                half["parity"] = check_parity(
                    model, half["tmp"], dtype=np.float16, providers=_fp16_providers()
                )
            except Exception as e:  # the CPU EP lacks some fp16 kernels; CUDA runs it
                half["parity"] = {"skipped": f"{type(e).__name__}: {e}"[:300]}
        listing = [
            {
                "variant": item["variant"],
                "file": item["file"],
                "bytes": item["bytes"],
                "max_abs_logit_diff": item["parity"].get("max_abs_logit_diff"),
                **{
                    k: item[k]
                    for k in ("val_loss", "passes_quality_gate", "decode_ms_per_token")
                    if k in item
                },
            }
            for item in done
        ]
        for item in done:
            os.replace(item.pop("tmp"), model_dir / item["file"])
        _write_json(
            model_dir / "variants.json", {"quality_gate": QUALITY_GATE, "variants": listing}
        )
    finally:
        for item in done:
            if "tmp" in item:
                with contextlib.suppress(FileNotFoundError):
                    item["tmp"].unlink()
    result: dict[str, Any] = {
        # The fp32 graph's max |logit difference|, the figure the model record keeps.
        "max_abs_diff": fp32["parity"]["max_abs_logit_diff"],
        "files": {item["file"]: item for item in done},
        "variants": listing,
        "input_names": input_names(cfg.n_layers),
        "output_names": output_names(cfg.n_layers),
    }
    if fp16:
        result["fp16_max_abs_diff"] = half["parity"].get("max_abs_logit_diff")
    return result
