"""The typed results of the SDK: plain dataclasses, no protobuf.

Enumerations are `str` enums, so `job.state == "SUCCEEDED"` and `job.state is
JobState.SUCCEEDED` both hold; times are timezone-aware `datetime`s (None when unset).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Generic, TypeVar

__all__ = [
    "JobState",
    "JobEventType",
    "ModelState",
    "FinishReason",
    "ModelSpec",
    "TrainingSpec",
    "JobSpec",
    "ParameterCount",
    "Progress",
    "Dataset",
    "Job",
    "JobEvent",
    "Model",
    "ModelInfo",
    "Usage",
    "Timings",
    "Completion",
    "CompletionChunk",
    "Page",
]


class _StrEnum(str, Enum):
    def __str__(self) -> str:
        return self.value


class JobState(_StrEnum):
    """Where a job is in `QUEUED → RUNNING → EXPORTING → SUCCEEDED` (or FAILED, CANCELLED)."""

    UNSPECIFIED = "UNSPECIFIED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    EXPORTING = "EXPORTING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"
    #: Checkpointed and holding no worker until `client.jobs.resume`.
    PAUSED = "PAUSED"

    @property
    def terminal(self) -> bool:
        """True for SUCCEEDED, FAILED and CANCELLED: the job will not change again."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobEventType(_StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    STATE = "STATE"
    PROGRESS = "PROGRESS"
    EVAL = "EVAL"
    CHECKPOINT = "CHECKPOINT"
    LOG = "LOG"


class ModelState(_StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    #: Its job is still queued, training or exporting.
    TRAINING = "TRAINING"
    READY = "READY"
    #: Its job failed or was cancelled.
    ABANDONED = "ABANDONED"


class FinishReason(_StrEnum):
    """Why generation ended."""

    UNSPECIFIED = "unspecified"
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"


@dataclass
class ModelSpec:
    """The shape of a model. Fields left None come from the preset (or server defaults)."""

    n_layers: int | None = None
    n_heads: int | None = None
    #: Key/value heads for grouped-query attention; n_heads when unset.
    n_kv_heads: int | None = None
    #: Hidden size; must be divisible by n_heads.
    d_model: int | None = None
    #: SwiGLU hidden size; about 8/3 * d_model when unset.
    intermediate_size: int | None = None
    context_length: int | None = None
    #: Vocabulary of a `bpe` tokenizer; `char` and `byte` derive it from the corpus.
    vocab_size: int | None = None
    #: "bpe", "char" or "byte".
    tokenizer: str | None = None
    dropout: float | None = None
    tie_embeddings: bool | None = None
    rope_theta: float | None = None


@dataclass
class TrainingSpec:
    """How a model is trained. Fields left None come from the preset (or server defaults)."""

    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum_steps: int | None = None
    learning_rate: float | None = None
    min_learning_rate: float | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    grad_clip: float | None = None
    eval_interval: int | None = None
    eval_batches: int | None = None
    val_fraction: float | None = None
    checkpoint_interval: int | None = None
    seed: int | None = None
    #: "auto", "fp32", "bf16" or "fp16".
    precision: str | None = None
    #: "auto", "on" or "off".
    compile: str | None = None
    #: Stop after this many evaluations without a better validation loss; 0 turns it off.
    early_stopping_patience: int | None = None
    #: A registered model ("name@version", "name", an id) or a local Llama directory.
    init_from: str | None = None
    #: A progress event every this many steps.
    log_interval: int | None = None
    #: End the job SUCCEEDED at the first evaluation at or below this validation loss.
    target_val_loss: float | None = None
    #: Devices (GPUs) per node; more than 1 runs DDP under torchrun. batch_size is global.
    devices: int | None = None
    #: Nodes per job (1 for queued jobs).
    nodes: int | None = None


@dataclass
class JobSpec:
    """A job's resolved spec: the preset with every default and override applied."""

    preset: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)


@dataclass
class ParameterCount:
    """The model's exact parameter count, split by kind, and its training FLOPs per token."""

    total: int = 0
    embedding: int = 0
    attention: int = 0
    mlp: int = 0
    norm: int = 0
    #: Forward + backward FLOPs per token of the job (6N + 12 L d T; with LoRA
    #: 4N + 6 N_trainable + 12 L d T: frozen weights need no gradients of their own).
    flops_per_token: int = 0


@dataclass
class Progress:
    """A training progress snapshot. Zero means "not yet known" (e.g. val_loss before an eval)."""

    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    eta_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    tokens_seen: int = 0
    val_loss: float = 0.0
    val_bits_per_byte: float = 0.0
    best_val_loss: float = 0.0
    best_step: int = 0
    #: Total gradient norm of the logged step, before clipping.
    grad_norm: float = 0.0
    #: When training should end, from the steps measured so far (None before the first).
    estimated_finish: datetime | None = None

    @property
    def fraction(self) -> float:
        """step / total_steps, in [0, 1]."""
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


@dataclass
class Dataset:
    """An uploaded corpus. Datasets are content-addressed: `id` is the sha256 of the bytes."""

    id: str
    owner: str = ""
    name: str = ""
    sha256: str = ""
    size_bytes: int = 0
    num_chars: int = 0
    #: Distinct characters (the vocabulary of a `char` tokenizer, before specials).
    num_distinct_chars: int = 0
    created_at: datetime | None = None


@dataclass
class Job:
    """A training job and everything known about it so far."""

    id: str
    state: JobState = JobState.UNSPECIFIED
    owner: str = ""
    dataset_id: str = ""
    #: The model the job registers when it succeeds.
    model_name: str = ""
    #: The resolved spec (preset and defaults applied).
    spec: JobSpec = field(default_factory=JobSpec)
    parameters: ParameterCount = field(default_factory=ParameterCount)
    progress: Progress = field(default_factory=Progress)
    #: Why the job failed, when it did.
    error: str = ""
    #: The model the job registers (reserved while it runs).
    model_id: str = ""
    attempt: int = 0
    request_id: str = ""
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: Where it ran: CPU or the CUDA device's name.
    device: str = ""
    #: The labels given at creation (`jobs.create(metadata=...)`).
    metadata: dict[str, str] = field(default_factory=dict)
    #: The dataset evaluated on instead of a split (`jobs.create(validation_dataset=...)`).
    validation_dataset_id: str = ""
    #: "<job id>:<step>" for a job made by `jobs.export_checkpoint` (it exports, not trains).
    export_of: str = ""

    @property
    def done(self) -> bool:
        """True once the job is SUCCEEDED, FAILED or CANCELLED."""
        return self.state.terminal


@dataclass
class Checkpoint:
    """A kept checkpoint of a job (`client.jobs.checkpoints`)."""

    #: "<job id>:<step>": what `training.init_from` takes to start from it.
    ref: str
    step: int
    #: The training loss last logged at or before `step`.
    train_loss: float = 0.0
    #: The latest evaluation at or before `step` (val_step 0: none yet).
    val_loss: float = 0.0
    val_bits_per_byte: float = 0.0
    val_step: int = 0
    created_at: datetime | None = None


@dataclass
class ValidationReport:
    """What a job would do and what is wrong with it (`client.jobs.validate`)."""

    corpus_tokens: int = 0
    #: Exact for the char and byte tokenizers, estimated for BPE.
    tokens_exact: bool = False
    vocab_size: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    training_flops: int = 0
    weights_bytes: int = 0
    optimizer_bytes: int = 0
    activations_bytes: int = 0
    #: Device class ("cpu", a GPU name) -> seconds.
    estimated_seconds: dict[str, float] = field(default_factory=dict)
    #: True when the estimate comes from measured throughput, False for the fallback rate.
    estimate_measured: bool = False
    #: Corpus characters init_from's tokenizer cannot encode.
    characters_lost: int = 0
    trainable_parameters: int = 0
    problems: list[str] = field(default_factory=list)
    #: The resolved spec and its parameter count.
    spec: JobSpec = field(default_factory=JobSpec)
    parameters: ParameterCount = field(default_factory=ParameterCount)


@dataclass
class MetricRow:
    """One logged training step (`client.jobs.metrics`); val_* are None where not evaluated."""

    step: int
    loss: float = 0.0
    learning_rate: float = 0.0
    grad_norm: float = 0.0
    tokens_per_second: float = 0.0
    val_loss: float | None = None
    val_bits_per_byte: float | None = None
    elapsed_seconds: float = 0.0
    tokens_seen: int = 0


@dataclass
class JobEvent:
    """One event in a job's history: a state change, progress, an evaluation, a checkpoint, a log line."""

    #: The event's id; `jobs.watch(job_id, after_event_id=...)` resumes after it.
    id: str
    job_id: str
    type: JobEventType
    #: The job's state after this event.
    state: JobState
    time: datetime | None = None
    progress: Progress = field(default_factory=Progress)
    message: str = ""
    #: True for the job's last event (SUCCEEDED, FAILED or CANCELLED).
    terminal: bool = False


@dataclass
class Model:
    """A registered model version."""

    id: str
    name: str = ""
    version: int = 0
    owner: str = ""
    job_id: str = ""
    state: ModelState = ModelState.UNSPECIFIED
    parameters: ParameterCount = field(default_factory=ParameterCount)
    spec: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: str = ""
    context_length: int = 0
    vocab_size: int = 0
    #: Best validation loss per token, and in bits per byte.
    val_loss: float = 0.0
    val_bits_per_byte: float = 0.0
    #: max |logit difference| between PyTorch and ONNX Runtime, measured at export.
    onnx_parity_max_abs_diff: float = 0.0
    files: list[str] = field(default_factory=list)
    dataset_sha256: str = ""
    created_at: datetime | None = None


@dataclass
class ModelInfo:
    """How the inference server serves a model (loading it if needed)."""

    model_id: str
    name: str = ""
    version: int = 0
    #: "CUDAExecutionProvider" or "CPUExecutionProvider".
    execution_provider: str = ""
    #: "fp32" or "fp16".
    dtype: str = ""
    context_length: int = 0
    vocab_size: int = 0
    eos_token_id: int = 0
    loaded: bool = False
    #: The graph variant served ("fp32", "int8", "int4", "fp16").
    variant: str = ""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Where a generation's time went, in milliseconds, and its decode speed."""

    queue_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class Choice:
    """One of the `n` samples of a completion (`Completion.choices`)."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    completion_tokens: int = 0


@dataclass
class Completion:
    """The result of `client.generate` (with n > 1, `text` and `token_ids` are sample 0's;
    `choices` holds every sample)."""

    #: The model version that generated it.
    model_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    #: Log-probabilities of the chosen tokens, when requested with `logprobs=True`.
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    #: The request's `request_id`, echoed.
    request_id: str = ""
    #: Every sample, when the request asked for n > 1.
    choices: list[Choice] = field(default_factory=list)
    #: Prompt tokens whose KV cache came from an earlier request (prefix reuse).
    cached_prompt_tokens: int = 0
    #: Times the context window was shifted (`context_shift=True`).
    context_shifts: int = 0


@dataclass
class CompletionChunk:
    """One delta of `client.stream`. The last one has `final` set and carries the
    finish reason, usage and timings."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    final: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    model_id: str = ""
    #: The request's `request_id`, echoed.
    request_id: str = ""
    #: Which of the request's `n` samples this delta belongs to.
    index: int = 0
    context_shifts: int = 0


T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    """One page of a list call; `next_page_token` is empty on the last page."""

    items: list[T]
    next_page_token: str = ""
