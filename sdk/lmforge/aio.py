"""The asyncio client: `AsyncClient`, the same surface as `Client` with `await`/`async for`."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio

from lmforge import _convert, errors
from lmforge._connection import DEFAULT_TIMEOUT, Addresses, ConnectionConfig, channel_target
from lmforge._download import ModelDirWriter
from lmforge._paging import PageCursor
from lmforge._progress import JobProgressBar
from lmforge._retry import Attempts, Deadline, RetryPolicy
from lmforge._streaming import StreamState
from lmforge._upload import CHUNK_BYTES, PreparedUpload, ProgressCallback, UploadSource
from lmforge._watch import RECONNECT_TIMEOUT, WatchResume
from lmforge.types import (
    Checkpoint,
    Completion,
    CompletionChunk,
    Dataset,
    Job,
    JobEvent,
    JobState,
    MetricRow,
    Model,
    ModelInfo,
    ModelSpec,
    Page,
    TrainingSpec,
    ValidationReport,
)
from lmforge.v1 import inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc

__all__ = ["AsyncClient", "AsyncPager", "AsyncCompletionStream"]

T = TypeVar("T")


def _channel(config: ConnectionConfig, addr: str) -> grpc.aio.Channel:
    target, options = channel_target(addr)
    creds = config.credentials()
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)


class AsyncPager(Generic[T]):
    """The results of a list call: `async for` over the items (pages are fetched as
    needed), or over `.pages()`."""

    def __init__(self, fetch: Callable[[str], Awaitable[Page[T]]]):
        self._fetch = fetch

    async def pages(self) -> AsyncIterator[Page[T]]:
        cursor = PageCursor()
        while not cursor.done:
            page = await self._fetch(cursor.token)
            cursor.advance(page)
            yield page

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.pages():
            for item in page.items:
                yield item


class AsyncCompletionStream:
    """The deltas of one generation: `async for` over it; `await stream.close()` (or leave
    its `async with` block) to stop early, which cancels the generation on the server."""

    def __init__(
        self, start: Callable[[float | None], Any], deadline: Deadline, retry: RetryPolicy
    ):
        self._start, self._state = start, StreamState(deadline, retry)
        self._call = start(deadline.remaining())
        self._it = self._call.__aiter__()

    def __aiter__(self) -> AsyncCompletionStream:
        return self

    async def __anext__(self) -> CompletionChunk:
        state = self._state
        while not state.closed:
            try:
                return state.accept(await self._it.__anext__())
            except StopAsyncIteration:
                state.closed = True
            except grpc.RpcError as e:
                if state.closed:
                    break
                await asyncio.sleep(state.restart_delay(e))
                self._call = self._start(state.deadline.remaining())
                self._it = self._call.__aiter__()
        raise StopAsyncIteration

    @property
    def final(self) -> CompletionChunk | None:
        """The last delta (finish reason, usage, timings), once it arrived."""
        return self._state.final

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._state.text

    async def close(self) -> None:
        """Stops reading; a generation still running is cancelled on the server."""
        if not self._state.closed:
            self._state.closed = True
            self._call.cancel()

    async def __aenter__(self) -> AsyncCompletionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Resource:
    def __init__(self, client: AsyncClient):
        self._client = client


class AsyncDatasets(_Resource):
    """Text corpora to train on: `client.datasets`. See `lmforge.client.Datasets`."""

    async def upload(
        self,
        source: UploadSource,
        *,
        name: str | None = None,
        progress: ProgressCallback | None = None,
        chunk_size: int = CHUNK_BYTES,
        timeout: float | None = None,
    ) -> Dataset:
        """Uploads a corpus (a path, bytes, or a binary file object) in chunks with its sha256."""
        # Hashing a large file would stall the event loop.
        prepared = await asyncio.to_thread(PreparedUpload, source, name, chunk_size)
        try:
            msg = await self._client._call(
                self._client._datasets.UploadDataset,
                lambda: prepared.requests(progress),
                timeout=timeout,
                streaming=True,
            )
        finally:
            prepared.close()
        return _convert.dataset(msg)

    async def get(self, dataset_id: str | Dataset, *, timeout: float | None = None) -> Dataset:
        """The dataset with this id (its sha256)."""
        req = training_pb2.GetDatasetRequest(id=_convert.ref(dataset_id))
        return _convert.dataset(
            await self._client._call(self._client._datasets.GetDataset, req, timeout=timeout)
        )

    def list(self, *, page_size: int = 100, timeout: float | None = None) -> AsyncPager[Dataset]:
        """Every dataset of the caller, fetched a page at a time as the iterator advances."""

        async def fetch(token: str) -> Page[Dataset]:
            req = training_pb2.ListDatasetsRequest(page_size=page_size, page_token=token)
            resp = await self._client._call(
                self._client._datasets.ListDatasets, req, timeout=timeout
            )
            return _convert.page([_convert.dataset(d) for d in resp.datasets], resp.next_page_token)

        return AsyncPager(fetch)

    async def delete(self, dataset_id: str | Dataset, *, timeout: float | None = None) -> None:
        """Deletes the dataset (NotFoundError if there is none)."""
        req = training_pb2.DeleteDatasetRequest(id=_convert.ref(dataset_id))
        await self._client._call(self._client._datasets.DeleteDataset, req, timeout=timeout)


class AsyncJobs(_Resource):
    """Training jobs: `client.jobs`. See `lmforge.client.Jobs`."""

    async def create(
        self,
        *,
        dataset: str | Dataset,
        preset: str = "",
        model: ModelSpec | Mapping[str, Any] | None = None,
        training: TrainingSpec | Mapping[str, Any] | None = None,
        model_name: str = "",
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        validation_dataset: str | Dataset | None = None,
        timeout: float | None = None,
    ) -> Job:
        """Queues a training job; retried safely through `request_id` (generated if not given)."""
        req = _convert.create_job_request(
            dataset, preset, model, training, model_name, request_id, metadata, validation_dataset
        )
        return _convert.job(
            await self._client._call(self._client._jobs.CreateJob, req, timeout=timeout)
        )

    async def validate(
        self,
        *,
        dataset: str | Dataset,
        preset: str = "",
        model: ModelSpec | Mapping[str, Any] | None = None,
        training: TrainingSpec | Mapping[str, Any] | None = None,
        validation_dataset: str | Dataset | None = None,
        timeout: float | None = None,
    ) -> ValidationReport:
        """What `create` with the same arguments would do (tokens, splits, FLOPs, memory,
        estimated time per device class) and every problem found; nothing is created."""
        req = _convert.create_job_request(
            dataset, preset, model, training, "", "", None, validation_dataset
        )
        req.validate_only = True
        return _convert.validation_report(
            await self._client._call(self._client._jobs.CreateJob, req, timeout=timeout)
        )

    async def checkpoints(
        self, job_id: str | Job, *, timeout: float | None = None
    ) -> list[Checkpoint]:
        """The job's kept checkpoints by step: the best by validation loss and the newest."""
        req = training_pb2.ListCheckpointsRequest(id=_convert.ref(job_id))
        resp = await self._client._call(self._client._jobs.ListCheckpoints, req, timeout=timeout)
        return [_convert.checkpoint(c) for c in resp.checkpoints]

    async def export_checkpoint(
        self,
        job_id: str | Job,
        step: int,
        *,
        model_name: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Job:
        """Exports the job's kept checkpoint at `step` and registers it as a new version of
        `model_name` (the job's own when empty); returns the export job (wait for it)."""
        req = training_pb2.ExportCheckpointRequest(
            job_id=_convert.ref(job_id),
            step=step,
            model_name=model_name,
            request_id=request_id or uuid.uuid4().hex,
        )
        return _convert.job(
            await self._client._call(self._client._jobs.ExportCheckpoint, req, timeout=timeout)
        )

    async def get(self, job_id: str | Job, *, timeout: float | None = None) -> Job:
        """The job's current record: state, progress, parameters, resolved spec."""
        req = training_pb2.GetJobRequest(id=_convert.ref(job_id))
        return _convert.job(
            await self._client._call(self._client._jobs.GetJob, req, timeout=timeout)
        )

    def list(
        self,
        *,
        state: str | JobState | None = None,
        metadata: Mapping[str, str] | None = None,
        page_size: int = 100,
        timeout: float | None = None,
    ) -> AsyncPager[Job]:
        """The caller's jobs (only those in `state` when given), fetched a page at a time."""
        state_pb = _convert.job_state_to_pb(state) if state else 0

        async def fetch(token: str) -> Page[Job]:
            req = training_pb2.ListJobsRequest(
                page_size=page_size, page_token=token, state=state_pb, metadata=metadata or {}
            )
            resp = await self._client._call(self._client._jobs.ListJobs, req, timeout=timeout)
            return _convert.page([_convert.job(j) for j in resp.jobs], resp.next_page_token)

        return AsyncPager(fetch)

    async def cancel(self, job_id: str | Job, *, timeout: float | None = None) -> Job:
        """Asks the job to stop; it checkpoints and ends CANCELLED within seconds."""
        req = training_pb2.CancelJobRequest(id=_convert.ref(job_id))
        return _convert.job(
            await self._client._call(self._client._jobs.CancelJob, req, timeout=timeout)
        )

    async def pause(self, job_id: str | Job, *, timeout: float | None = None) -> Job:
        """Checkpoints the job and releases its worker (state PAUSED); `resume` goes on."""
        req = training_pb2.PauseJobRequest(id=_convert.ref(job_id))
        return _convert.job(
            await self._client._call(self._client._jobs.PauseJob, req, timeout=timeout)
        )

    async def resume(self, job_id: str | Job, *, timeout: float | None = None) -> Job:
        """Requeues a paused job; it continues from its checkpoint."""
        req = training_pb2.ResumeJobRequest(id=_convert.ref(job_id))
        return _convert.job(
            await self._client._call(self._client._jobs.ResumeJob, req, timeout=timeout)
        )

    async def metrics(self, job_id: str | Job, *, timeout: float | None = None) -> list[MetricRow]:
        """Every logged step so far: loss, learning rate, grad norm, tokens/s, val loss."""
        req = training_pb2.GetJobMetricsRequest(id=_convert.ref(job_id))
        stub = self._client._jobs.GetJobMetrics

        async def fetch(r, **kw):
            return [m async for m in stub(r, **kw)]

        rows = await self._client._call(fetch, req, timeout=timeout)
        return [_convert.metric_row(r) for r in rows]

    async def watch(
        self,
        job_id: str | Job,
        *,
        after_event_id: str = "",
        timeout: float | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ) -> AsyncIterator[JobEvent]:
        """The job's events, resuming transparently after a dropped connection or a
        restarted server; ends with the terminal event. See `Client.jobs.watch`."""
        client = self._client
        resume = WatchResume(
            _convert.ref(job_id), after_event_id, timeout, reconnect_timeout, client._config.retry
        )
        while True:
            call = client._jobs.WatchJob(
                resume.request(), timeout=resume.remaining(), metadata=client._config.metadata
            )
            error: grpc.RpcError | None = None
            try:
                async for msg in call:
                    event = resume.received(msg)
                    yield event
                    if event.terminal:
                        return
            except grpc.RpcError as e:
                error = e
            finally:
                call.cancel()
            await asyncio.sleep(resume.backoff(error))

    async def wait(
        self, job_id: str | Job, *, timeout: float | None = None, progress: bool = False
    ) -> Job:
        """Waits for the job to finish; returns it if it SUCCEEDED, else raises
        `JobFailedError` (or `WaitTimeoutError` after `timeout`)."""
        job = await self.get(job_id)
        if not job.done:
            bar = JobProgressBar(job) if progress else None
            try:
                async for event in self.watch(job.id, timeout=timeout):
                    if bar:
                        bar.update(event)
            except errors.DeadlineExceededError:
                raise errors.WaitTimeoutError(job.id, timeout or 0.0) from None
            finally:
                if bar:
                    bar.close()
            job = await self.get(job.id)
        if job.state is not JobState.SUCCEEDED:
            raise errors.JobFailedError(job)
        return job


class AsyncModels(_Resource):
    """Trained models: `client.models`. See `lmforge.client.Models`."""

    def list(
        self, *, name: str | None = None, page_size: int = 100, timeout: float | None = None
    ) -> AsyncPager[Model]:
        """The caller's models (only versions of `name` when given), a page at a time."""

        async def fetch(token: str) -> Page[Model]:
            req = training_pb2.ListModelsRequest(
                page_size=page_size, page_token=token, name=name or ""
            )
            resp = await self._client._call(self._client._models.ListModels, req, timeout=timeout)
            return _convert.page([_convert.model(m) for m in resp.models], resp.next_page_token)

        return AsyncPager(fetch)

    async def get(self, model: str | Model, *, timeout: float | None = None) -> Model:
        """By id, "name@version", "name@latest" or "name"."""
        req = training_pb2.GetModelRequest(id=_convert.ref(model))
        return _convert.model(
            await self._client._call(self._client._models.GetModel, req, timeout=timeout)
        )

    async def delete(self, model: str | Model, *, timeout: float | None = None) -> None:
        """Deletes the model version (NotFoundError if there is none)."""
        req = training_pb2.DeleteModelRequest(id=_convert.ref(model))
        await self._client._call(self._client._models.DeleteModel, req, timeout=timeout)

    async def download(
        self, model: str | Model, directory: str | os.PathLike, *, timeout: float | None = None
    ) -> list[Path]:
        """Writes the READY model's files into `directory`, each checked against its sha256."""
        req = training_pb2.DownloadModelRequest(id=_convert.ref(model))
        writer = ModelDirWriter(directory)
        call = self._client._models.DownloadModel(
            req, timeout=timeout, metadata=self._client._config.metadata
        )
        try:
            async for chunk in call:
                writer.feed(chunk)
        except grpc.RpcError as e:
            writer.abort()
            raise errors.from_rpc_error(e) from e
        return writer.finish()

    async def info(
        self, model: str | Model, *, variant: str = "", timeout: float | None = None
    ) -> ModelInfo:
        """How the inference server serves the model (it loads it if needed)."""
        req = inference_pb2.GetModelInfoRequest(model=_convert.ref(model), variant=variant)
        return _convert.model_info(
            await self._client._call(self._client._inference.GetModelInfo, req, timeout=timeout)
        )


class AsyncClient:
    """The asyncio twin of `lmforge.Client`; same arguments, same resources.

    async with AsyncClient() as client:
        async with client.stream("shakespeare", "ROMEO:") as stream:
            async for delta in stream:
                print(delta.text, end="")
    """

    def __init__(
        self,
        *,
        api_addr: Addresses | None = None,
        inference_addr: Addresses | None = None,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        tls_ca_file: str | None = None,
        retry: RetryPolicy | None = None,
        tls_client_cert_file: str | None = None,
        tls_client_key_file: str | None = None,
    ):
        self._config = ConnectionConfig.resolve(
            api_addr=api_addr,
            inference_addr=inference_addr,
            api_key=api_key,
            timeout=timeout,
            tls_ca_file=tls_ca_file,
            retry=retry,
            tls_client_cert_file=tls_client_cert_file,
            tls_client_key_file=tls_client_key_file,
        )
        # grpc.aio channels belong to the event loop they are made in, so they are made on
        # first use: an AsyncClient may be built before `asyncio.run`.
        self._api_channel: grpc.aio.Channel | None = None
        self._inference_channel: grpc.aio.Channel | None = None
        self.datasets = AsyncDatasets(self)
        self.jobs = AsyncJobs(self)
        self.models = AsyncModels(self)

    @property
    def api_addr(self) -> str:
        return self._config.api_addr

    @property
    def inference_addr(self) -> str:
        return self._config.inference_addr

    def _api(self) -> grpc.aio.Channel:
        if self._api_channel is None:
            self._api_channel = _channel(self._config, self._config.api_addr)
        return self._api_channel

    @property
    def _datasets(self) -> training_pb2_grpc.DatasetServiceStub:
        return training_pb2_grpc.DatasetServiceStub(self._api())

    @property
    def _jobs(self) -> training_pb2_grpc.JobServiceStub:
        return training_pb2_grpc.JobServiceStub(self._api())

    @property
    def _models(self) -> training_pb2_grpc.ModelServiceStub:
        return training_pb2_grpc.ModelServiceStub(self._api())

    @property
    def _inference(self) -> inference_pb2_grpc.InferenceServiceStub:
        if self._inference_channel is None:
            self._inference_channel = _channel(self._config, self._config.inference_addr)
        return inference_pb2_grpc.InferenceServiceStub(self._inference_channel)

    async def _call(
        self,
        method: Callable[..., Any],
        request: Any,
        *,
        timeout: float | None,
        streaming: bool = False,
    ) -> Any:
        """`Client._call` with await: deadline, API key, retries on UNAVAILABLE."""
        if timeout is None and not streaming:
            timeout = self._config.timeout
        attempts = Attempts(self._config.retry, timeout)
        while True:
            req = request() if callable(request) else request
            try:
                return await method(
                    req, timeout=attempts.remaining(), metadata=self._config.metadata
                )
            except grpc.RpcError as e:
                await asyncio.sleep(attempts.backoff(e))

    async def generate(
        self,
        model: str | Model,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        logprobs: bool = False,
        truncate_prompt: bool = False,
        n: int | None = None,
        request_id: str = "",
        context_shift: bool = False,
        variant: str = "",
        timeout: float | None = None,
    ) -> Completion:
        """Generates a completion of `prompt` with `model`. See `Client.generate`."""
        req = _convert.generate_request(
            model, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
            logprobs=logprobs, truncate_prompt=truncate_prompt, n=n, request_id=request_id,
            context_shift=context_shift, variant=variant,
        )  # fmt: skip
        return _convert.completion(await self._call(self._inference.Generate, req, timeout=timeout))

    def stream(
        self,
        model: str | Model,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        logprobs: bool = False,
        truncate_prompt: bool = False,
        n: int | None = None,
        request_id: str = "",
        context_shift: bool = False,
        variant: str = "",
        timeout: float | None = None,
    ) -> AsyncCompletionStream:
        """Text deltas as they are produced; closing the stream cancels the generation."""
        req = _convert.generate_request(
            model, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
            logprobs=logprobs, truncate_prompt=truncate_prompt, n=n, request_id=request_id,
            context_shift=context_shift, variant=variant,
        )  # fmt: skip

        def start(remaining: float | None) -> Any:
            return self._inference.GenerateStream(
                req, timeout=remaining, metadata=self._config.metadata
            )

        return AsyncCompletionStream(start, Deadline(timeout), self._config.retry)

    async def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Ends the generation sent with `request_id`. See `Client.abort`."""
        req = _convert.abort_request(request_id)
        return (await self._call(self._inference.Abort, req, timeout=timeout)).aborted

    async def close(self) -> None:
        for channel in (self._api_channel, self._inference_channel):
            if channel is not None:
                await channel.close()
        self._api_channel = self._inference_channel = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
