"""ONNX export with a static KV cache, and the PyTorch <-> ONNX Runtime parity check.

The graph is built op by op from the weights (`lmforge_worker.graph`, which documents its
inputs and outputs): attention is ONNX Runtime's GroupQueryAttention, whose KV cache the
server preallocates per batch slot and ONNX Runtime writes in place.

Beside the fp32 graph, quantised variants of it (`VARIANTS`): int8 and int4, weight-only
MatMulNBits with 8- and 4-bit weights in blocks of 32 and int8 compute. Each is checked like
fp32 (parity, recorded not enforced) and scored on the job's validation tokens
(teacher-forced through the graph's own KV cache); one whose loss is more than QUALITY_GATE
above fp32's is marked as failing the gate, and the server never serves it by default. The
facts land in `variants.json` beside the graphs.

With the quantised variants comes one prefill graph (`quantize_prefill`: int8 weights, int8
activations per row, MatMulInteger), checked and gated the same way; the server runs the
quantised variants' prompts through it where it passed. `variants.json` lists it under
"prefill".
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge_worker.graph import (
    MAX_IR_VERSION,
    OPSET,
    build_graph,
    cache_head_dim,
    input_names,
    output_names,
)
from lmforge_worker.model import Llama, load_pretrained

__all__ = ["OPSET", "ParityError", "export_onnx", "input_names", "output_names"]

FP32_PARITY_LIMIT = 1e-4
PARITY_PROMPT_TOKENS = 16
PARITY_DECODE_STEPS = 32
VARIANTS = ("int8", "int4")
# A quantised graph may lose at most this fraction of fp32's validation loss to be served.
QUALITY_GATE = 0.01
EVAL_WINDOWS, EVAL_LENGTH = 8, 64
QUANT_BLOCK_SIZE = 32
# The w8a8 prefill graph (`quantize_prefill`), written with the quantised variants: prompts
# of the int8/int4 variants run through it, their decode steps through their own graph.
# Measured (10.65M model, 64-token prompt, 1 thread, CPU ms): int4 MatMulNBits 13.5, this
# graph 6.5; but a batch-1 decode step 0.94 against int4's 0.47, hence two graphs.
PREFILL_FILE = "model_prefill.onnx"


class ParityError(RuntimeError):
    """ONNX Runtime's logits differ from PyTorch's by more than the limit."""

    def __init__(self, max_abs_diff: float, limit: float):
        super().__init__(
            f"ONNX export parity check failed: max |logit difference| {max_abs_diff:.3g} "
            f"exceeds {limit:g} (PyTorch vs ONNX Runtime, fp32)"
        )
        self.max_abs_diff = max_abs_diff
        self.limit = limit


# Exporter, by measurement (torch 2.13 CPU, 10.7M-parameter model, 2 cores, ORT 1.31):
# torch.onnx.export (dynamo) took 7.9 s and wrote attention as MatMul/Softmax over a cache
# concatenated every step; the graph builder ("gqa") writes GroupQueryAttention, whose cache
# is written in place (1.5x the tokens/s of the concatenating graph at batch 16 and 64).
DEFAULT_EXPORTER = "gqa"
_EXPORTERS = {"gqa": build_graph}


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


def _feeds(cfg, ids: np.ndarray, past: list[np.ndarray]) -> dict:
    """Inputs for `ids` [B, S] on top of a concatenating cache of P tokens per row."""
    P, (B, S) = past[0].shape[2], ids.shape
    feeds = {
        "input_ids": ids,
        "seqlens_k": np.full(B, P + S - 1, np.int32),
        "total_sequence_length": np.array(P + S, np.int32),
    }
    feeds.update(zip(input_names(cfg.n_layers)[3:], past, strict=True))
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
    past = [np.zeros((1, cfg.n_kv_heads, 0, cache_head_dim(cfg.head_dim)), dtype)] * (
        2 * cfg.n_layers
    )

    t_logits, t_past = model(ids, last_only=True)
    out = sess.run(None, _feeds(cfg, ids.numpy(), past))
    prefill = float(np.abs(out[0].astype(np.float32) - t_logits.numpy()).max())
    decode, tokens_match = 0.0, True
    for _ in range(steps):
        nxt = t_logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens_match &= int(out[0][0, -1].argmax()) == int(nxt)
        t_logits, t_past = model(nxt, past_key_values=t_past)
        out = sess.run(None, _feeds(cfg, nxt.numpy(), list(out[1:])))
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

    tmp = _tmp_beside(target)
    try:
        started = time.perf_counter()
        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        _EXPORTERS[exporter](model.float().eval(), tmp, dtype=np_dtype)
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


# Blocked QuantizeLinear (a scale per block of a row) came with opset 21 (IR 10).
PREFILL_OPSET = 21


def quantize_prefill(src: Path, dst: Path) -> None:
    """Writes the w8a8 prefill graph of the fp32 graph `src` to `dst`: same inputs, outputs
    and KV cache, for running prompt tokens (M > 1), where MatMulNBits is slow.

    Every MatMul with a constant weight W [K, N] becomes an int8 GEMM on int8 weights
    (symmetric, one scale per output column) and uint8 activations quantised PER ROW (each
    token row its own scale absmax/127, zero point 128), so a row's result never depends on
    the other rows: batching, padding and chunking leave a request's tokens alone, which
    DynamicQuantizeLinear (one scale per tensor) would not. The GEMM is ORT's
    MatMulIntegerToFloat (com.microsoft, column scales applied inside; the row scale after):
    one node for MatMulInteger + Cast + Mul, 426 -> 340 nodes and ~5-10% of a 64-token
    prefill's CPU time on the 10.65M model. A row is quantised by one blocked QuantizeLinear
    (opset 21, the row one block) where Div, Round, Add and Cast made four passes over it:
    the same numbers (logits bit-identical), a 64-token prefill 4.55 against 4.85 ms.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(src))
    _fold_weight_transposes(proto)
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list = []
    rows: dict[str, tuple[str, str]] = {}

    def const(name: str, arr: np.ndarray) -> str:
        if name not in inits:
            inits[name] = numpy_helper.from_array(arr, name)
            graph.initializer.append(inits[name])
        return name

    def op(op_type: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [out], name=f"w8a8/{out}", **attrs))
        return out

    zero_points: dict[str, str] = {}
    gathered = False  # past the GatherElements that keeps each row's last position
    for node in graph.node:
        gathered = gathered or node.op_type == "GatherElements"
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        if x not in rows:  # one quantisation per activation (q, k and v share theirs)
            p = f"{x}/rowq"
            amax = op(
                "ReduceMax",
                [op("Abs", [x], f"{p}/abs"), const("w8a8_last_axis", np.array([-1], np.int64))],
                f"{p}/amax",
                keepdims=1,
            )
            scale = op("Mul", [amax, const("w8a8_inv127", np.array(1 / 127, np.float32))], f"{p}/s")
            # An all-zero row (padding) gets a tiny scale, not a division by zero.
            scale = op(
                "Max", [scale, const("w8a8_tiny", np.array(1e-30, np.float32))], f"{p}/scale"
            )
            # The zero points must have the scales' shape: [B, S, 1] in the layers, [B, 1, 1]
            # after the last position is gathered for the output projection. One per shape.
            shape_class = "last" if gathered else "all"
            if shape_class not in zero_points:
                zero_points[shape_class] = op(
                    "Expand",
                    [
                        const("w8a8_128_u8", np.array(128, np.uint8)),
                        op("Shape", [scale], f"w8a8/{shape_class}/bs1"),
                    ],
                    f"w8a8/{shape_class}/zero_point",
                )
            zero_point = zero_points[shape_class]
            # One block of the whole row (opset 21): round(x / scale) + 128, saturated to
            # uint8, in one node where Div, Round, Add and Cast took four passes.
            q = op(
                "QuantizeLinear",
                [x, scale, zero_point],
                f"{p}/q",
                axis=-1,
                block_size=int(w.dims[0]),
            )
            rows[x] = (q, scale)
        q, scale = rows[x]
        W = numpy_helper.to_array(w).astype(np.float32)
        ws = np.abs(W).max(axis=0) / 127
        ws[ws == 0] = 1.0
        wq = const(f"{w.name}_int8", np.clip(np.round(W / ws), -127, 127).astype(np.int8))
        wscale = const(f"{w.name}_scale", ws.astype(np.float32))
        zp = const("w8a8_zero_point", np.array(128, np.uint8))
        one = const("w8a8_one", np.array(1.0, np.float32))
        f = op(
            "MatMulIntegerToFloat",
            [q, wq, one, wscale, zp],
            f"{y}/colscaled",
            domain="com.microsoft",
        )
        op("Mul", [f, scale], y)
    del graph.node[:]
    graph.node.extend(nodes)
    live = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in live]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for o in proto.opset_import:  # blocked QuantizeLinear
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, PREFILL_OPSET)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.save(proto, str(dst))


def eval_windows(tokens: np.ndarray, context_length: int) -> np.ndarray:
    """Up to EVAL_WINDOWS evenly spaced windows [W, L + 1] of `tokens` for `graph_val_loss`."""
    tokens = np.asarray(tokens, dtype=np.int64)
    length = min(EVAL_LENGTH, context_length - 1, len(tokens) - 1)
    if length < 2:
        raise ValueError(f"need at least 3 evaluation tokens, got {len(tokens)}")
    starts = np.linspace(0, len(tokens) - length - 1, EVAL_WINDOWS).astype(np.int64)
    return np.stack([tokens[s : s + length + 1] for s in np.unique(starts)])


def graph_val_loss(sess, cfg, windows: np.ndarray) -> float:
    """Mean next-token loss of the graph's ONNX Runtime session `sess` over `windows`, fed
    one token at a time through its own KV cache (the graph emits last-position logits only)."""
    B, L = windows.shape[0], windows.shape[1] - 1
    past = [np.zeros((B, cfg.n_kv_heads, 0, cache_head_dim(cfg.head_dim)), np.float32)] * (
        2 * cfg.n_layers
    )
    total = 0.0
    for t in range(L):
        out = sess.run(None, _feeds(cfg, windows[:, t : t + 1], past))
        past = list(out[1:])
        logits = out[0][:, -1].astype(np.float64)
        m = logits.max(axis=1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        total += float((logz - logits[np.arange(B), windows[:, t + 1]]).sum())
    return total / (B * L)


def decode_ms_per_token(path: Path, cfg, *, steps: int = 32, repeats: int = 3) -> float:
    """Batch-1 greedy decode latency of the graph on this machine's CPU (best of `repeats`),
    run as the server runs it: on a slot cache of the full context (`SlotGraph`, one
    preallocated buffer bound as past and present and written in place), not a cache
    concatenated every step."""
    from lmforge_server.inference.session import SlotGraph

    return _decode_ms(SlotGraph(_session(path)), cfg, steps=steps, repeats=repeats)


def _decode_ms(graph, cfg, *, steps: int = 32, repeats: int = 3) -> float:
    """`decode_ms_per_token` on a `SlotGraph` already open."""
    cache = graph.new_cache(1, cfg.context_length)
    # Short contexts (the tiny preset has 32 positions) get fewer steps, never none.
    steps = max(1, min(steps, cfg.context_length // 2))
    n = max(1, min(16, cfg.context_length - steps - 1))
    ids = np.arange(n, dtype=np.int64)[None] % cfg.vocab_size
    best = float("inf")
    for _ in range(repeats):
        logits = graph.run(cache, ids, [n - 1])
        t = time.perf_counter()
        for i in range(steps):
            nxt = logits.argmax(-1)[:, None].astype(np.int64)
            logits = graph.run(cache, nxt, [n + i])
        best = min(best, (time.perf_counter() - t) / steps * 1e3)
    return best


def prefill_ms(graph, cfg, *, tokens: int = 64, repeats: int = 5) -> float:
    """Latency of one prompt of `tokens` tokens (fewer where the context is shorter) through
    the `SlotGraph` into an empty slot, as the server prefills (best of `repeats`)."""
    cache = graph.new_cache(1, cfg.context_length)
    n = max(2, min(tokens, cfg.context_length - 1))
    ids = np.arange(n, dtype=np.int64)[None] % cfg.vocab_size
    graph.run(cache, ids, [n - 1])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        graph.run(cache, ids, [n - 1])
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best


def _score_variants(model: Llama, items: list[dict], eval_tokens) -> None:
    """Adds val_loss, passes_quality_gate, decode_ms_per_token and prefill_ms to each
    variant's facts."""
    cfg = model.config
    windows = None if eval_tokens is None else eval_windows(eval_tokens, cfg.context_length)
    ref = None
    from lmforge_server.inference.session import SlotGraph

    for item in items:
        # One session per graph for all three measurements (opening one is the costly part
        # of each for a large model).
        graph = SlotGraph(_session(item["tmp"]))
        item["decode_ms_per_token"] = round(_decode_ms(graph, cfg), 4)
        item["prefill_ms"] = round(prefill_ms(graph, cfg), 4)
        item["val_loss"] = None if windows is None else graph_val_loss(graph.session, cfg, windows)
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
        prefill = None
        if len(scored) > 1:
            target = model_dir / PREFILL_FILE
            prefill = {"tmp": _tmp_beside(target), "file": target.name, "variant": "prefill"}
            done.append(prefill)
            t = time.perf_counter()
            quantize_prefill(fp32["tmp"], prefill["tmp"])
            prefill["export_seconds"] = round(time.perf_counter() - t, 3)
            prefill["bytes"] = prefill["tmp"].stat().st_size
            prefill["parity"] = check_parity(model, prefill["tmp"])
            _score_variants(model, [*scored, prefill], eval_tokens)
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
                    for k in (
                        "val_loss",
                        "passes_quality_gate",
                        "decode_ms_per_token",
                        "prefill_ms",
                    )
                    if k in item
                },
            }
            for item in done
        ]
        facts: dict[str, Any] = {"quality_gate": QUALITY_GATE, "variants": listing}
        if prefill is not None:
            # Not a variant to serve: the graph the quantised variants' prompts run through.
            facts["prefill"] = listing.pop(done.index(prefill))
            facts["prefill"].update(
                kind="w8a8", prefill_for=[item["variant"] for item in scored[1:]]
            )
            if "val_loss_increase" in prefill:
                facts["prefill"]["val_loss_increase"] = prefill["val_loss_increase"]
        for item in done:
            os.replace(item.pop("tmp"), model_dir / item["file"])
        _write_json(model_dir / "variants.json", facts)
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
        "prefill": facts.get("prefill"),
        "input_names": input_names(cfg.n_layers),
        "output_names": output_names(cfg.n_layers),
    }
    if fp16:
        result["fp16_max_abs_diff"] = half["parity"].get("max_abs_logit_diff")
    return result
