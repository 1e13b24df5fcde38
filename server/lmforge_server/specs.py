"""Job specs: presets, validation with field names, and exact parameter counts.

Pure Python (no torch): the API server validates and counts, the worker builds the same
model from the same resolved spec.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "on", "off")
# Every tokenizer appends one special token, the end-of-text marker, after its own vocabulary.
EOS_TOKEN = "<|endoftext|>"
BYTE_VOCAB = 256 + 1
MAX_PARAMETERS = 2_000_000_000
MAX_DEVICES = 64
MAX_NODES = 64


class SpecError(ValueError):
    """A spec field is out of range; `field` is its dotted name (e.g. "model.n_heads")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    intermediate_size: int
    context_length: int
    vocab_size: int
    tokenizer: str
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int
    batch_size: int
    grad_accum_steps: int = 1
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    val_fraction: float = 0.1
    checkpoint_interval: int = 500
    seed: int = 1337
    precision: str = "auto"
    compile: str = "auto"
    early_stopping_patience: int = 0
    init_from: str = ""
    log_interval: int = 10
    # End the job SUCCEEDED at the first evaluation at or below this val loss (0: never).
    target_val_loss: float = 0.0
    # LoRA (0: full fine-tuning): adapters of rank r, scaled alpha / r, on these projections.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj"
    # Processes (GPUs) per node and nodes per job; batch_size is the global batch, split
    # evenly across all devices * nodes ranks.
    devices: int = 1
    nodes: int = 1

    @property
    def lora_target_list(self) -> list[str]:
        return [x.strip() for x in self.lora_targets.split(",") if x.strip()]


@dataclass(frozen=True)
class JobSpec:
    preset: str
    model: ModelConfig
    training: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        return cls(
            preset=d["preset"],
            model=ModelConfig(**d["model"]),
            training=TrainConfig(**d["training"]),
        )


@dataclass(frozen=True)
class ParameterCount:
    total: int
    embedding: int
    attention: int
    mlp: int
    norm: int
    flops_per_token: int
    # Parameters the job trains (all, or the LoRA adapters' alone); 0 where not known.
    trainable: int = 0


# Presets: only the fields they set; the rest come from the dataclass defaults.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # For tests: a few thousand parameters, trains in seconds.
    "tiny": {
        "model": dict(n_layers=2, n_heads=2, d_model=32, context_length=32, tokenizer="char"),
        "training": dict(
            max_steps=60,
            batch_size=8,
            learning_rate=3e-3,
            min_learning_rate=3e-4,
            warmup_steps=5,
            eval_interval=20,
            eval_batches=4,
            checkpoint_interval=20,
            log_interval=5,
            weight_decay=0.0,
        ),
    },
    # The CPU demo: about a minute on two cores.
    "small": {
        "model": dict(n_layers=4, n_heads=4, d_model=128, context_length=64, tokenizer="char"),
        "training": dict(
            max_steps=1500,
            batch_size=12,
            learning_rate=2e-3,
            min_learning_rate=2e-4,
            warmup_steps=50,
            eval_interval=250,
            eval_batches=10,
            checkpoint_interval=500,
            log_interval=10,
            weight_decay=0.0,
        ),
    },
    # About 10M parameters (nanoGPT's shakespeare-char shape).
    "baby": {
        "model": dict(
            n_layers=6, n_heads=6, d_model=384, context_length=256, tokenizer="char", dropout=0.2
        ),
        "training": dict(
            max_steps=5000,
            batch_size=64,
            learning_rate=1e-3,
            min_learning_rate=1e-4,
            warmup_steps=100,
            beta2=0.99,
            eval_interval=250,
            eval_batches=50,
            checkpoint_interval=500,
        ),
    },
    # GPT-2 small's shape: 12 layers, 12 heads, width 768, 1024 context, about 124M parameters.
    "gpt2-small": {
        "model": dict(
            n_layers=12,
            n_heads=12,
            d_model=768,
            context_length=1024,
            tokenizer="bpe",
            vocab_size=50304,
        ),
        "training": dict(
            max_steps=20000,
            batch_size=16,
            grad_accum_steps=8,
            learning_rate=6e-4,
            min_learning_rate=6e-5,
            warmup_steps=700,
            eval_interval=500,
            eval_batches=40,
            checkpoint_interval=1000,
        ),
    },
}
DEFAULT_PRESET = "small"


def default_intermediate_size(d_model: int) -> int:
    """SwiGLU width: 8/3 of d_model (same FLOPs as a 4x GELU MLP), rounded up to 64."""
    return int(math.ceil(8 * d_model / 3 / 64) * 64)


def derived_vocab_size(tokenizer: str, num_distinct_chars: int) -> int | None:
    """The vocabulary a `char` or `byte` tokenizer gets from a corpus (with end-of-text)."""
    if tokenizer == "char":
        return num_distinct_chars + 1
    if tokenizer == "byte":
        return BYTE_VOCAB
    return None


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise SpecError(name, message)


def _int_range(name: str, value: int, lo: int, hi: int) -> None:
    _check(lo <= value <= hi, name, f"must be between {lo} and {hi}, got {value}")


def _float_range(name: str, value: float, lo: float, hi: float, *, lo_open=False, hi_open=False):
    ok = math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo)
    ok = ok and (value < hi if hi_open else value <= hi)
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    _check(ok, name, f"must be in {interval}, got {value:g}")


def resolve(
    preset: str,
    model: dict[str, Any],
    training: dict[str, Any],
    *,
    num_distinct_chars: int,
    base_model: ModelConfig | None = None,
) -> JobSpec:
    """Applies overrides to a preset (or to `base_model` when fine-tuning) and validates.

    `model` and `training` hold only the fields a request set. Raises SpecError naming the
    first field that is out of range.
    """
    preset = preset or DEFAULT_PRESET
    _check(preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {preset!r}")
    base = PRESETS[preset]

    if base_model is not None:
        for key, value in model.items():
            _check(
                getattr(base_model, key) == value,
                f"model.{key}",
                f"is fixed by init_from ({getattr(base_model, key)!r}); leave it unset",
            )
        mcfg = base_model
    else:
        merged = {**base["model"], **model}
        d_model = merged.get("d_model", 0)
        merged.setdefault("n_kv_heads", merged.get("n_heads"))
        if merged.get("intermediate_size") in (None, 0):
            merged["intermediate_size"] = default_intermediate_size(d_model) if d_model else 0
        tok = merged.get("tokenizer", "char")
        _check(
            tok in ("bpe", "char", "byte"),
            "model.tokenizer",
            f"must be one of bpe, char, byte, got {tok!r}",
        )
        derived = derived_vocab_size(tok, num_distinct_chars)
        if derived is not None:
            if "vocab_size" in model:
                _check(
                    model["vocab_size"] == derived,
                    "model.vocab_size",
                    f"is set by the {tok} tokenizer ({derived} for this dataset); leave it unset",
                )
            merged["vocab_size"] = derived
        else:
            merged.setdefault("vocab_size", 8192)
        mcfg = ModelConfig(**merged)
        _validate_model(mcfg)

    tcfg = TrainConfig(**{**base["training"], **training})
    _validate_training(tcfg)
    spec = JobSpec(preset=preset, model=mcfg, training=tcfg)
    total = count_parameters(mcfg).total
    _check(
        total <= MAX_PARAMETERS,
        "model",
        f"has {total:,} parameters; the limit is {MAX_PARAMETERS:,}",
    )
    return spec


def check_fleet(spec: JobSpec, max_devices: int) -> None:
    """Raises SpecError when no worker of this deployment could take the job (its queue
    would never be read)."""
    t = spec.training
    _check(
        t.devices <= max_devices,
        "training.devices",
        f"must be at most {max_devices} (the largest worker of this deployment), got {t.devices}",
    )
    # Workers run one node each; a job over several nodes is started with torchrun by hand
    # (README, "Multi-node training"), not through the queue.
    _check(t.nodes == 1, "training.nodes", f"must be 1 for queued jobs, got {t.nodes}")


def _validate_model(m: ModelConfig) -> None:
    _int_range("model.n_layers", m.n_layers, 1, 128)
    _int_range("model.n_heads", m.n_heads, 1, 256)
    _int_range("model.d_model", m.d_model, 8, 16384)
    _check(
        m.d_model % m.n_heads == 0,
        "model.d_model",
        f"must be divisible by model.n_heads ({m.n_heads}), got {m.d_model}",
    )
    _check(
        m.head_dim % 2 == 0,
        "model.d_model",
        f"d_model / n_heads must be even for rotary positions, got {m.head_dim}",
    )
    _int_range("model.n_kv_heads", m.n_kv_heads, 1, m.n_heads)
    _check(
        m.n_heads % m.n_kv_heads == 0,
        "model.n_kv_heads",
        f"must divide model.n_heads ({m.n_heads}), got {m.n_kv_heads}",
    )
    _int_range("model.intermediate_size", m.intermediate_size, 1, 65536)
    _int_range("model.context_length", m.context_length, 4, 32768)
    if m.tokenizer == "bpe":
        _int_range("model.vocab_size", m.vocab_size, BYTE_VOCAB + 3, 262144)
    _float_range("model.dropout", m.dropout, 0.0, 1.0, hi_open=True)
    _float_range("model.rope_theta", m.rope_theta, 1.0, 1e9)


def _validate_training(t: TrainConfig) -> None:
    _int_range("training.max_steps", t.max_steps, 1, 10_000_000)
    _int_range("training.batch_size", t.batch_size, 1, 4096)
    _int_range("training.grad_accum_steps", t.grad_accum_steps, 1, 1024)
    _float_range("training.learning_rate", t.learning_rate, 0.0, 1.0, lo_open=True)
    _float_range("training.min_learning_rate", t.min_learning_rate, 0.0, t.learning_rate)
    _int_range("training.warmup_steps", t.warmup_steps, 0, t.max_steps)
    _float_range("training.weight_decay", t.weight_decay, 0.0, 1.0)
    _float_range("training.beta1", t.beta1, 0.0, 1.0, hi_open=True)
    _float_range("training.beta2", t.beta2, 0.0, 1.0, hi_open=True)
    _float_range("training.grad_clip", t.grad_clip, 0.0, 1e6)
    _int_range("training.eval_interval", t.eval_interval, 1, 10_000_000)
    _int_range("training.eval_batches", t.eval_batches, 1, 10_000)
    _float_range("training.val_fraction", t.val_fraction, 0.0, 0.5, lo_open=True)
    _int_range("training.checkpoint_interval", t.checkpoint_interval, 1, 10_000_000)
    _int_range("training.seed", t.seed, 0, 2**63 - 1)
    _check(
        t.precision in PRECISIONS,
        "training.precision",
        f"must be one of {', '.join(PRECISIONS)}, got {t.precision!r}",
    )
    _check(
        t.compile in COMPILE_MODES,
        "training.compile",
        f"must be one of {', '.join(COMPILE_MODES)}, got {t.compile!r}",
    )
    _int_range("training.early_stopping_patience", t.early_stopping_patience, 0, 1_000_000)
    _int_range("training.log_interval", t.log_interval, 1, 1_000_000)
    _float_range("training.target_val_loss", t.target_val_loss, 0.0, 1000.0)
    _int_range("training.devices", t.devices, 1, MAX_DEVICES)
    _int_range("training.nodes", t.nodes, 1, MAX_NODES)
    ranks = t.devices * t.nodes
    _check(
        t.batch_size % ranks == 0,
        "training.batch_size",
        f"must be divisible by training.devices * training.nodes ({ranks}), got {t.batch_size}",
    )
    _int_range("training.lora_rank", t.lora_rank, 0, 1024)
    if t.lora_rank:
        _check(
            bool(t.init_from),
            "training.lora_rank",
            "LoRA adapts an existing model: set training.init_from too",
        )
        _float_range("training.lora_alpha", t.lora_alpha, 0.0, 1e4, lo_open=True)
        _float_range("training.lora_dropout", t.lora_dropout, 0.0, 1.0, hi_open=True)
        targets = t.lora_target_list
        bad = [x for x in targets if x not in LORA_TARGETS]
        _check(
            bool(targets) and not bad and len(set(targets)) == len(targets),
            "training.lora_targets",
            f"a comma-separated list of distinct names among {', '.join(LORA_TARGETS)}, "
            f"got {t.lora_targets[:100]!r}",
        )


# The projections LoRA may adapt, with (input, output) widths as functions of the config.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_shape(m: ModelConfig, name: str) -> tuple[int, int]:
    d, hd, ff = m.d_model, m.head_dim, m.intermediate_size
    return {
        "q_proj": (d, m.n_heads * hd),
        "k_proj": (d, m.n_kv_heads * hd),
        "v_proj": (d, m.n_kv_heads * hd),
        "o_proj": (m.n_heads * hd, d),
        "gate_proj": (d, ff),
        "up_proj": (d, ff),
        "down_proj": (ff, d),
    }[name]


def trainable_parameters(spec: JobSpec) -> int:
    """Parameters the job trains: all of the model's, or with LoRA the adapters' alone
    (r x (in + out) per adapted projection and layer)."""
    m, t = spec.model, spec.training
    if not t.lora_rank:
        return count_parameters(m).total
    per_layer = sum(t.lora_rank * sum(_lora_shape(m, x)) for x in t.lora_target_list)
    return m.n_layers * per_layer


def training_flops_per_token(spec: JobSpec) -> int:
    """Training FLOPs per token (forward + backward) of the job.

    Full training: 6N + 12 L d T (see `count_parameters`). LoRA: the frozen weights still
    run forward (2N) and pass gradients back to their inputs (2N), but need no gradient
    of their own (the third 2N), while the adapters cost 6 per parameter like any trained
    weight: 4N + 6 N_trainable + 12 L d T. Attention scores have no weights: unchanged.
    """
    m, t = spec.model, spec.training
    full = count_parameters(m)
    if not t.lora_rank:
        return full.flops_per_token
    matmul = _matmul_parameters(m, full.attention, full.mlp)
    return 4 * matmul + 6 * trainable_parameters(spec) + _attention_score_flops(m)


def _matmul_parameters(m: ModelConfig, attention: int, mlp: int) -> int:
    # The weights that multiply activations: the output projection included, the input
    # lookup (which multiplies nothing) and the norms (elementwise) not.
    return attention + mlp + m.vocab_size * m.d_model


def _attention_score_flops(m: ModelConfig) -> int:
    # QK^T and AV over the full context, forward and backward (PaLM, appendix B).
    return 12 * m.n_layers * m.d_model * m.context_length


def count_parameters(m: ModelConfig) -> ParameterCount:
    """Exact parameter count of the Llama model built from `m`, split by kind."""
    d, hd = m.d_model, m.head_dim
    embedding = m.vocab_size * d * (1 if m.tie_embeddings else 2)
    attention = m.n_layers * (2 * d * d + 2 * d * m.n_kv_heads * hd)
    mlp = m.n_layers * 3 * d * m.intermediate_size
    norm = (2 * m.n_layers + 1) * d
    total = embedding + attention + mlp + norm
    # 6N for the matmuls with weights plus 12 L d T for attention scores over the full
    # context (PaLM, appendix B).
    flops = 6 * _matmul_parameters(m, attention, mlp) + _attention_score_flops(m)
    return ParameterCount(total, embedding, attention, mlp, norm, flops)


def model_config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a HF Llama config.json dict.

    Raises ValueError for what this model cannot represent (biases, another activation, rope
    scaling, a head_dim other than hidden_size / num_attention_heads). The tokenizer kind is
    `lmforge_tokenizer` when we wrote the file, else "pretrained".
    """
    arch = d.get("architectures") or ["LlamaForCausalLM"]
    if d.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in arch:
        raise ValueError(f"not a Llama model: model_type={d.get('model_type')!r}")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError("biases in attention/MLP are not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be silu, got {d.get('hidden_act')!r}")
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    rope_type = rope.get("rope_type") or (scaling or {}).get("rope_type") or "default"
    if rope_type != "default" or (scaling and scaling.get("type", "default") != "default"):
        raise ValueError(f"rope scaling {rope_type!r} is not supported")
    rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    hidden, n_heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    head_dim = d.get("head_dim") or hidden // n_heads
    if head_dim * n_heads != hidden:
        raise ValueError(f"head_dim {head_dim} * heads {n_heads} != hidden_size {hidden}")
    return ModelConfig(
        n_layers=int(d["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        d_model=hidden,
        intermediate_size=int(d["intermediate_size"]),
        context_length=int(d.get("max_position_embeddings", 2048)),
        vocab_size=int(d["vocab_size"]),
        tokenizer=d.get("lmforge_tokenizer", "pretrained"),
        dropout=float(d.get("attention_dropout") or 0.0),
        # HF's default for Llama is untied.
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        rope_theta=rope_theta,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
    )
