from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ModelSpec(_message.Message):
    __slots__ = ("n_layers", "n_heads", "n_kv_heads", "d_model", "intermediate_size", "context_length", "vocab_size", "tokenizer", "dropout", "tie_embeddings", "rope_theta")
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    N_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TIE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    ROPE_THETA_FIELD_NUMBER: _ClassVar[int]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    intermediate_size: int
    context_length: int
    vocab_size: int
    tokenizer: str
    dropout: float
    tie_embeddings: bool
    rope_theta: float
    def __init__(self, n_layers: _Optional[int] = ..., n_heads: _Optional[int] = ..., n_kv_heads: _Optional[int] = ..., d_model: _Optional[int] = ..., intermediate_size: _Optional[int] = ..., context_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., tokenizer: _Optional[str] = ..., dropout: _Optional[float] = ..., tie_embeddings: _Optional[bool] = ..., rope_theta: _Optional[float] = ...) -> None: ...

class TrainingSpec(_message.Message):
    __slots__ = ("max_steps", "batch_size", "grad_accum_steps", "learning_rate", "min_learning_rate", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "eval_interval", "eval_batches", "val_fraction", "checkpoint_interval", "seed", "precision", "compile", "early_stopping_patience", "init_from", "log_interval", "target_val_loss", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MIN_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    EVAL_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    EVAL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    COMPILE_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    INIT_FROM_FIELD_NUMBER: _ClassVar[int]
    LOG_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    TARGET_VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    max_steps: int
    batch_size: int
    grad_accum_steps: int
    learning_rate: float
    min_learning_rate: float
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    eval_interval: int
    eval_batches: int
    val_fraction: float
    checkpoint_interval: int
    seed: int
    precision: str
    compile: str
    early_stopping_patience: int
    init_from: str
    log_interval: int
    target_val_loss: float
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str
    def __init__(self, max_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., grad_accum_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., min_learning_rate: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., grad_clip: _Optional[float] = ..., eval_interval: _Optional[int] = ..., eval_batches: _Optional[int] = ..., val_fraction: _Optional[float] = ..., checkpoint_interval: _Optional[int] = ..., seed: _Optional[int] = ..., precision: _Optional[str] = ..., compile: _Optional[str] = ..., early_stopping_patience: _Optional[int] = ..., init_from: _Optional[str] = ..., log_interval: _Optional[int] = ..., target_val_loss: _Optional[float] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., lora_targets: _Optional[str] = ...) -> None: ...

class ParameterCount(_message.Message):
    __slots__ = ("total", "embedding", "attention", "mlp", "norm", "flops_per_token", "trainable")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    MLP_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    FLOPS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    total: int
    embedding: int
    attention: int
    mlp: int
    norm: int
    flops_per_token: int
    trainable: int
    def __init__(self, total: _Optional[int] = ..., embedding: _Optional[int] = ..., attention: _Optional[int] = ..., mlp: _Optional[int] = ..., norm: _Optional[int] = ..., flops_per_token: _Optional[int] = ..., trainable: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...
