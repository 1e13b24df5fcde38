"""The inference graph, built op by op from the weights: attention is ONNX Runtime's
`com.microsoft` GroupQueryAttention, so the KV cache is a preallocated buffer written in
place (how onnxruntime-genai's model builder exports Llama models).

The contract (names as onnxruntime-genai uses them):
  inputs   input_ids [batch, seq] int64,
           seqlens_k [batch] int32: per row, the tokens in its cache after this call, minus 1,
           total_sequence_length [] int32: the largest of those (+1) in the batch,
           past_key_values.<i>.key / .value [batch, n_kv, past, head_dim]
  outputs  logits [batch, 1, vocab] (float32): each row's last real token,
           present.<i>.key / .value [batch, n_kv, max(past, total), head_dim]
Positions are cache indices: a row's new tokens sit at [seqlens_k + 1 - seq, seqlens_k + 1)
of its cache (a first prompt may be right-padded: the row's tokens are its first
seqlens_k + 1), and rotary positions are those indices (GQA applies them).

Two ways to run it, by what `past` is:
- past of `past` tokens, no sharing: present = past + the new rows (a concatenating cache,
  as the parity check and the quality score use it);
- past = a [batch, n_kv, max_len, head_dim] buffer bound (IO binding) as both past and
  present: ORT's GQA sees the same pointer and writes the new rows in place, copying
  nothing else (the serving cache, inference/session.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge_worker.model import Llama

MS = "com.microsoft"
OPSET = 18
MAX_IR_VERSION = 10


def input_names(n_layers: int) -> list[str]:
    names = ["input_ids", "seqlens_k", "total_sequence_length"]
    for i in range(n_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(n_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


class _Builder:
    def __init__(self, dtype: np.dtype):
        from onnx import TensorProto

        self.nodes: list = []
        self.inits: list = []
        self.dtype = np.dtype(dtype)
        self.elem = TensorProto.FLOAT16 if self.dtype == np.float16 else TensorProto.FLOAT
        self._n = 0
        self._consts: dict[str, str] = {}

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str, t: torch.Tensor) -> str:
        return self.init(name, t.detach().float().numpy().astype(self.dtype))

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs):
        from onnx import helper

        outs = [self.name(op_type) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(
                op_type, inputs, outs, name=self.name(op_type + "_node"), domain=domain, **attrs
            )
        )
        return outs[0] if n_out == 1 else outs

    def rms(self, x: str, w: str, eps: float) -> str:
        """RMSNorm in standard ops, the pattern ONNX Runtime fuses into its
        SimplifiedLayerNormalization kernel (the checker does not know that op)."""
        if "rms_two" not in self._consts:
            self._consts["rms_two"] = self.init("rms_two", np.array(2.0, self.dtype))
            self._consts["rms_eps"] = self.init("rms_eps", np.array(eps, self.dtype))
            self._consts["rms_axes"] = self.init("rms_axes", np.array([-1], np.int64))
        c = self._consts
        ms = self.op("ReduceMean", [self.op("Pow", [x, c["rms_two"]]), c["rms_axes"]], keepdims=1)
        norm = self.op("Div", [x, self.op("Sqrt", [self.op("Add", [ms, c["rms_eps"]])])])
        return self.op("Mul", [norm, w])

    def linear(self, x: str, w: str) -> str:
        return self.op("MatMul", [x, w])


def cache_head_dim(head_dim: int) -> int:
    """The head_dim of the graph's cache: the model's, padded to a multiple of 16."""
    return -(-head_dim // 16) * 16


def _head_layout(D: int, Dp: int) -> np.ndarray:
    """Where each of a head's D dims goes in a head padded to Dp (GroupQueryAttention wants
    a multiple of 16): the two rotary halves stay Dp / 2 apart, so GQA's rotate-half pairs
    dim i with dim i + D / 2 as the model does; the padding is zeros, which add nothing to
    q.k and come out of attention as zeros that o_proj ignores."""
    half = D // 2
    return np.concatenate([np.arange(half), Dp // 2 + np.arange(D - half)])


def _pad_out(w: torch.Tensor, heads: int, D: int, Dp: int) -> torch.Tensor:
    """[heads * D, in] -> [heads * Dp, in], each head's rows laid out by `_head_layout`."""
    if D == Dp:
        return w
    out = torch.zeros(heads, Dp, w.shape[1], dtype=w.dtype)
    out[:, torch.from_numpy(_head_layout(D, Dp))] = w.reshape(heads, D, -1)
    return out.reshape(heads * Dp, -1)


def build_graph(model: Llama, path: Path, *, dtype: np.dtype = np.float32) -> None:
    """Writes the GroupQueryAttention graph of `model` to `path` (weights inside the file)."""
    import onnx
    from onnx import TensorProto, helper

    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items()}
    b = _Builder(dtype)
    L, H, KV, D = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    Dp = cache_head_dim(D)
    eps = float(cfg.rms_norm_eps)

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, "vocab"])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", b.elem, ["batch", KV, "past", Dp]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", b.elem, ["batch", KV, "present", D]
                )
            )

    # Rotary tables [context, Dp / 2], computed as the PyTorch model does (fp32); a padded
    # head's extra pairs get angle 0.
    pos = torch.arange(cfg.context_length, dtype=torch.float32)
    inv_freq = torch.zeros(Dp // 2)
    inv_freq[: D // 2] = model.inv_freq.float()
    freqs = pos[:, None] * inv_freq[None, :]
    cos = b.init("cos_cache", freqs.cos().numpy().astype(b.dtype))
    sin = b.init("sin_cache", freqs.sin().numpy().astype(b.dtype))

    embed = b.weight("embed_tokens", sd["model.embed_tokens.weight"])
    x = b.op("Gather", [embed, "input_ids"], axis=0)  # [B, S, d]
    for i in range(L):
        p = f"model.layers.{i}."
        h = b.rms(x, b.weight(f"ln1_{i}", sd[p + "input_layernorm.weight"]), eps)
        # q, k and v in one product, packed as GroupQueryAttention takes them (its key and
        # value inputs left empty): one weight read and one kernel launch for three.
        qkv_w = torch.cat(
            [
                _pad_out(sd[p + "self_attn.q_proj.weight"], H, D, Dp),
                _pad_out(sd[p + "self_attn.k_proj.weight"], KV, D, Dp),
                _pad_out(sd[p + "self_attn.v_proj.weight"], KV, D, Dp),
            ]
        )
        qkv = b.linear(h, b.weight(f"qkv_{i}", qkv_w.T))
        attn_out = f"attn_{i}"
        b.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    qkv,
                    "",
                    "",
                    f"past_key_values.{i}.key",
                    f"past_key_values.{i}.value",
                    "seqlens_k",
                    "total_sequence_length",
                    cos,
                    sin,
                ],
                [attn_out, f"present.{i}.key", f"present.{i}.value"],
                name=f"gqa_{i}",
                domain=MS,
                num_heads=H,
                kv_num_heads=KV,
                do_rotary=1,
                rotary_interleaved=0,
                scale=float(D**-0.5),
            )
        )
        a = b.linear(
            attn_out, b.weight(f"o_{i}", _pad_out(sd[p + "self_attn.o_proj.weight"].T, H, D, Dp))
        )
        x = b.op("Add", [x, a])
        h = b.rms(x, b.weight(f"ln2_{i}", sd[p + "post_attention_layernorm.weight"]), eps)
        # gate and up in one product, split after.
        gate_up = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        g, u = b.op(
            "Split",
            [b.linear(h, b.weight(f"gate_up_{i}", gate_up.T))],
            n_out=2,
            axis=-1,
            num_outputs=2,
        )
        act = b.op("Mul", [b.op("Mul", [g, b.op("Sigmoid", [g])]), u])
        x = b.op("Add", [x, b.linear(act, b.weight(f"down_{i}", sd[p + "mlp.down_proj.weight"].T))])

    # Each row's last real token: index min(seqlens_k, seq - 1) of the new ones (a right-
    # padded first prompt ends at seqlens_k; a decode step or a later chunk at seq - 1).
    seq = b.op("Gather", [b.op("Shape", [x]), b.init("one", np.array(1, np.int64))], axis=0)
    last = b.op("Sub", [seq, b.init("one_i64", np.array(1, np.int64))])
    idx = b.op("Min", [b.op("Cast", ["seqlens_k"], to=TensorProto.INT64), last])
    idx = b.op("Unsqueeze", [idx, b.init("axes12", np.array([1, 2], np.int64))])  # [B, 1, 1]
    shape = b.op(
        "Concat",
        [
            b.op("Gather", [b.op("Shape", [x]), b.init("zero", np.array([0], np.int64))], axis=0),
            b.init("one_d", np.array([1, cfg.d_model], np.int64)),
        ],
        axis=0,
    )
    idx = b.op("Expand", [idx, shape])  # [B, 1, d]
    x = b.op("GatherElements", [x, idx], axis=1)
    x = b.rms(x, b.weight("norm", sd["model.norm.weight"]), eps)
    logits = b.linear(x, b.weight("lm_head", sd["lm_head.weight"].T))
    if b.dtype != np.float32:
        logits = b.op("Cast", [logits], to=TensorProto.FLOAT)
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))

    graph = helper.make_graph(b.nodes, "lmforge", inputs, outputs, b.inits)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
        producer_name="lmforge",
        ir_version=MAX_IR_VERSION,
    )
    onnx.save(proto, str(path))
