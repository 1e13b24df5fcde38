"""A Llama-family decoder in plain PyTorch, with Hugging Face LlamaForCausalLM weight names.

RMSNorm, rotary positions (HF convention: rotate_half over the two halves of a head), SwiGLU
MLP, grouped-query attention (n_kv_heads < n_heads), optional tied embeddings, no biases.
The parameter names match `LlamaForCausalLM`, so `save_pretrained` writes a directory that
`transformers` opens and `load_pretrained` reads a local Llama checkpoint.

`forward` is also what the ONNX exporter traces: no Python branching on tensor values and no
data-dependent shapes; the KV cache is a tuple of per-layer (key, value) tensors.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge_server.artifacts import write_file_atomic
from lmforge_server.specs import ModelConfig
from lmforge_server.specs import model_config_from_hf as config_from_hf

# One layer's cache: (key, value), each [B, n_kv_heads, T, head_dim].
KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF does) so bf16 training matches the reference numerics.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, S, head_dim] for integer positions [B, S]."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # (B, S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, S, hd); cos/sin: (B, S, hd), broadcast over heads.
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past: KV | None,
    ) -> tuple[torch.Tensor, KV]:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, nkv, P+S, hd)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        if self.n_kv_heads != self.n_heads:
            # GQA: query head h reads kv head h // n_rep (same order as HF's repeat_kv).
            n_rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and past is None,
        )
        y = y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        return self.o_proj(y), present


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, past):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + self.resid_dropout(a)
        x = x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))
        return x, present


class LlamaModel(nn.Module):
    """The decoder stack; named `model` inside `Llama` to match HF's parameter names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)


class LoRALinear(nn.Linear):
    """A frozen projection plus a trainable low-rank update (LoRA, Hu et al. 2021):
    y = W x + (alpha / r) B A dropout(x). B starts at zero, so training starts exactly from
    the base model. The base weight keeps its name (`...q_proj.weight`); `merged_weight`
    is what the exported model holds."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight
        self.weight.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises
        self.scaling = alpha / rank
        self.lora_dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # p=0 dropout in training mode would still draw a mask: skip it.
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return F.linear(x, self.weight) + F.linear(F.linear(h, self.lora_A), self.lora_B) * (
            self.scaling
        )

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)


def add_lora(
    model: Llama, rank: int, alpha: float, dropout: float, targets: Sequence[str]
) -> Llama:
    """Freezes every weight of `model` and wraps the `targets` projections of each layer
    (q_proj, ..., down_proj) in LoRALinear: only the adapters train. In place."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.model.layers:
        for name in targets:
            parent = block.self_attn if hasattr(block.self_attn, name) else block.mlp
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    return model


class Llama(nn.Module):
    """Decoder-only language model built from a `ModelConfig`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        hd = cfg.head_dim
        inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
        )
        # Not persistent: derived from the config, and HF checkpoints do not hold it.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: scale the projections into the residual stream by depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Sequence[KV] | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, tuple[KV, ...]]:
        """Logits [B, S or 1, vocab] and the per-layer (key, value) cache [B, nkv, P+S, hd].

        `attention_mask` [B, P+S] marks real tokens 1 and (left) padding 0 over past and new
        tokens; without `position_ids`, positions then count real tokens only, so a
        left-padded row gives the same logits as the unpadded one. `last_only` computes the
        logits of the last position only (prefill for generation).
        """
        B, S = input_ids.shape
        P = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        device = input_ids.device
        if position_ids is None:
            if attention_mask is not None:
                # Positions count real tokens; pads get 0 (their outputs are never used).
                pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = pos[:, -S:]
            else:
                position_ids = torch.arange(P, P + S, device=device).unsqueeze(0).expand(B, S)

        x = self.drop(self.model.embed_tokens(input_ids))
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq, x.dtype)

        mask = None
        if attention_mask is not None or past_key_values is not None:
            # Additive mask: query i (absolute P+i) sees key j iff j <= P+i and key j is real.
            # finfo.min, not -inf: a pad query whose keys are all masked stays finite.
            q_pos = torch.arange(S, device=device) + P
            k_pos = torch.arange(P + S, device=device)
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, S, P+S)
            if attention_mask is not None:
                allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, S, P+S)
            zero = torch.zeros((), dtype=x.dtype, device=device)
            neg = torch.full((), torch.finfo(x.dtype).min, dtype=x.dtype, device=device)
            mask = torch.where(allowed, zero, neg)

        presents = []
        for i, layer in enumerate(self.model.layers):
            past = None if past_key_values is None else past_key_values[i]
            x, present = layer(x, cos, sin, mask, past)
            presents.append(present)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(self.model.norm(x))
        return logits, tuple(presents)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats per token) of predicting `targets` [B, S]."""
        logits, _ = self(input_ids)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


@torch.no_grad()
def generate(
    model: Llama,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continues `input_ids` [B, S] by up to `max_new_tokens` tokens with a KV cache.

    temperature 0 is greedy; otherwise samples from softmax(logits / temperature), restricted
    to the `top_k` most likely tokens when top_k > 0. Returns prompt + new tokens [B, S+N];
    stops early once every row has produced `eos_token_id` (rows that finished keep EOS).
    `attention_mask` [B, S] (1 real, 0 left padding) lets prompts of different lengths share
    a batch. Generation stops at the context length.
    """
    model.eval()
    ctx = model.config.context_length
    max_new_tokens = max(0, min(max_new_tokens, ctx - input_ids.shape[1]))
    out = input_ids
    B = input_ids.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits, past = model(input_ids, attention_mask=attention_mask, last_only=True)
    for step in range(max_new_tokens):
        logits_last = logits[:, -1, :].float()
        if temperature <= 0:
            nxt = logits_last.argmax(dim=-1)
        else:
            logits_last = logits_last / temperature
            if top_k > 0:
                kth = torch.topk(logits_last, min(top_k, logits_last.size(-1))).values[:, -1:]
                logits_last = logits_last.masked_fill(logits_last < kth, float("-inf"))
            probs = F.softmax(logits_last, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished = finished | (nxt == eos_token_id)
        out = torch.cat((out, nxt[:, None]), dim=1)
        if (eos_token_id is not None and bool(finished.all())) or step == max_new_tokens - 1:
            break
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(B, 1)), dim=1)
        logits, past = model(nxt[:, None], attention_mask=attention_mask, past_key_values=past)
    return out


# --- Hugging Face layout -------------------------------------------------------------------


def hf_config(cfg: ModelConfig, *, eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json contents for `LlamaForCausalLM` describing `cfg`.

    The end-of-text token (the last id of every lmforge tokenizer) is both BOS and EOS unless
    `eos_token_id` says otherwise. `lmforge_tokenizer` records the tokenizer kind.
    """
    eos = cfg.vocab_size - 1 if eos_token_id is None else eos_token_id
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        # transformers 4.x reads rope_theta, 5.x rope_parameters: write both.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.dropout,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "lmforge_tokenizer": cfg.tokenizer,
    }


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """Contiguous fp32 CPU tensors by HF name; a tied lm_head is left out, as HF saves it.
    LoRA adapters are merged into the weights they adapt (a plain Llama's weights)."""
    lora = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    sd = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if model.config.tie_embeddings and name == "lm_head.weight":
                continue
            if ".lora_" in name:
                continue
            if name in lora:
                t = lora[name].merged_weight()
            sd[name.removeprefix("_orig_mod.")] = t.detach().to("cpu", torch.float32).contiguous()
    return sd


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Writes a safetensors file atomically (temp file, fsync, rename)."""
    from safetensors.torch import save

    write_file_atomic(Path(path), save(state_dict, metadata={"format": "pt"}))


def save_pretrained(
    model: Llama,
    out_dir: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Writes model.safetensors and config.json (HF LlamaForCausalLM layout) into `out_dir`.

    `state_dict` (HF names, e.g. the best weights kept during training) replaces the model's
    current weights when given. Each file is written atomically. Returns `out_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(model) if state_dict is None else dict(state_dict)
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    save_weights(sd, out / "model.safetensors")
    cfg = hf_config(model.config, eos_token_id=eos_token_id)
    write_file_atomic(out / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
    return out


def load_pretrained(
    model_dir: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> tuple[Llama, ModelConfig]:
    """Loads a directory with config.json + model.safetensors (ours or a HF Llama one).

    Weights are loaded in fp32. Raises ValueError when the config is not a plain Llama or
    the weights do not match it (missing or unexpected tensors).
    """
    from safetensors.torch import load_file

    d = Path(model_dir)
    cfg = config_from_hf(json.loads((d / "config.json").read_text()))
    files = sorted(d.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"no model*.safetensors in {d}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    sd = {k: v.float() for k, v in sd.items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    model = Llama(cfg)
    expected = set(model.state_dict())
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(sd, strict=False)
    return model.to(device), cfg
