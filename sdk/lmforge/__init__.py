"""lmforge: train GPT-style language models on your own text and serve them over gRPC.

from lmforge import Client

client = Client()
dataset = client.datasets.upload("input.txt")
job = client.jobs.create(dataset=dataset, preset="small")
job = client.jobs.wait(job.id, progress=True)
print(client.generate(job.model_id, "ROMEO:", max_tokens=100).text)
"""

from lmforge._retry import RetryPolicy
from lmforge.aio import AsyncClient
from lmforge.client import Client
from lmforge.errors import (
    AlreadyExistsError,
    APIError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    JobFailedError,
    LmforgeError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    WaitTimeoutError,
)
from lmforge.types import (
    Checkpoint,
    Choice,
    Completion,
    CompletionChunk,
    Dataset,
    FinishReason,
    Job,
    JobEvent,
    JobEventType,
    JobSpec,
    JobState,
    MetricRow,
    Model,
    ModelInfo,
    ModelSpec,
    ModelState,
    Page,
    ParameterCount,
    Progress,
    Timings,
    TrainingSpec,
    Usage,
    ValidationReport,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "AsyncClient",
    "RetryPolicy",
    # results
    "Choice",
    "Completion",
    "CompletionChunk",
    "Dataset",
    "FinishReason",
    "Job",
    "JobEvent",
    "JobEventType",
    "JobSpec",
    "JobState",
    "Checkpoint",
    "MetricRow",
    "ValidationReport",
    "Model",
    "ModelInfo",
    "ModelSpec",
    "ModelState",
    "Page",
    "ParameterCount",
    "Progress",
    "Timings",
    "TrainingSpec",
    "Usage",
    # errors
    "LmforgeError",
    "APIError",
    "AlreadyExistsError",
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "JobFailedError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "WaitTimeoutError",
]
