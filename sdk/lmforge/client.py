"""The synchronous client: `Client().datasets / .jobs / .models`, `.generate`, `.stream`."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

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
from lmforge.v1 import inference_pb2_grpc, training_pb2, training_pb2_grpc

__all__ = ["Client", "Pager", "CompletionStream"]

T = TypeVar("T")


def _channel(config: ConnectionConfig, addr: str) -> grpc.Channel:
    target, options = channel_target(addr)
    creds = config.credentials()
    if creds is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, creds, options=options)


class Pager(Generic[T]):
    """The results of a list call: iterate for the items (pages are fetched as needed),
    or call `.pages()` for the pages themselves."""

    def __init__(self, fetch: Callable[[str], Page[T]]):
        self._fetch = fetch

    def pages(self) -> Iterator[Page[T]]:
        cursor = PageCursor()
        while not cursor.done:
            page = self._fetch(cursor.token)
            cursor.advance(page)
            yield page

    def __iter__(self) -> Iterator[T]:
        for page in self.pages():
            yield from page.items


class CompletionStream:
    """The deltas of one generation, in order. Iterate it; close it (or leave its `with`
    block) to stop early, which cancels the generation on the server.

    After the last delta, `.final` holds it (finish reason, usage, timings) and `.text` the
    whole generated text.
    """

    def __init__(
        self, start: Callable[[float | None], Any], deadline: Deadline, retry: RetryPolicy
    ):
        self._start, self._state = start, StreamState(deadline, retry)
        self._call = start(deadline.remaining())

    def __iter__(self) -> CompletionStream:
        return self

    def __next__(self) -> CompletionChunk:
        state = self._state
        while not state.closed:
            try:
                return state.accept(next(self._call))
            except StopIteration:
                state.closed = True
            except grpc.RpcError as e:
                if state.closed:  # closed from another thread while we waited
                    break
                time.sleep(state.restart_delay(e))
                self._call = self._start(state.deadline.remaining())
        raise StopIteration

    @property
    def final(self) -> CompletionChunk | None:
        """The last delta (finish reason, usage, timings), once it arrived."""
        return self._state.final

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._state.text

    def close(self) -> None:
        """Stops reading; a generation still running is cancelled on the server."""
        if not self._state.closed:
            self._state.closed = True
            self._call.cancel()

    def __enter__(self) -> CompletionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Resource:
    def __init__(self, client: Client):
        self._client = client


class Datasets(_Resource):
    """Text corpora to train on: `client.datasets`."""

    def upload(
        self,
        source: UploadSource,
        *,
        name: str | None = None,
        progress: ProgressCallback | None = None,
        chunk_size: int = CHUNK_BYTES,
        timeout: float | None = None,
    ) -> Dataset:
        """Uploads a corpus (a path, bytes, or a binary file object) in chunks with its sha256.

        The same bytes give the same dataset, so a retried upload is harmless. `name`
        defaults to the file's name. `progress(bytes_sent, total_bytes)` is called after each
        chunk. `timeout` bounds the whole upload (default: none).
        """
        prepared = PreparedUpload(source, name, chunk_size)
        try:
            msg = self._client._call(
                self._client._datasets.UploadDataset,
                lambda: prepared.requests(progress),
                timeout=timeout,
                streaming=True,
            )
        finally:
            prepared.close()
        return _convert.dataset(msg)

    def get(self, dataset_id: str | Dataset, *, timeout: float | None = None) -> Dataset:
        """The dataset with this id (its sha256)."""
        req = training_pb2.GetDatasetRequest(id=_convert.ref(dataset_id))
        return _convert.dataset(
            self._client._call(self._client._datasets.GetDataset, req, timeout=timeout)
        )

    def list(self, *, page_size: int = 100, timeout: float | None = None) -> Pager[Dataset]:
        """Every dataset of the caller, fetched a page at a time as the iterator advances."""

        def fetch(token: str) -> Page[Dataset]:
            req = training_pb2.ListDatasetsRequest(page_size=page_size, page_token=token)
            resp = self._client._call(self._client._datasets.ListDatasets, req, timeout=timeout)
            return _convert.page([_convert.dataset(d) for d in resp.datasets], resp.next_page_token)

        return Pager(fetch)

    def delete(self, dataset_id: str | Dataset, *, timeout: float | None = None) -> None:
        """Deletes the dataset (NotFoundError if there is none)."""
        req = training_pb2.DeleteDatasetRequest(id=_convert.ref(dataset_id))
        self._client._call(self._client._datasets.DeleteDataset, req, timeout=timeout)


class Jobs(_Resource):
    """Training jobs: `client.jobs`."""

    def create(
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
        """Queues a training job on a dataset. Fields left unset in `model` and `training`
        come from the preset ("tiny", "small", "baby", "gpt2-small"; the server's default
        when empty).

        Retried safely: the server returns the same job for the same `request_id`, which is
        generated when not given.
        """
        req = _convert.create_job_request(
            dataset, preset, model, training, model_name, request_id, metadata, validation_dataset
        )
        return _convert.job(self._client._call(self._client._jobs.CreateJob, req, timeout=timeout))

    def validate(
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
            self._client._call(self._client._jobs.CreateJob, req, timeout=timeout)
        )

    def checkpoints(self, job_id: str | Job, *, timeout: float | None = None) -> list[Checkpoint]:
        """The job's kept checkpoints by step: the best by validation loss and the newest."""
        req = training_pb2.ListCheckpointsRequest(id=_convert.ref(job_id))
        resp = self._client._call(self._client._jobs.ListCheckpoints, req, timeout=timeout)
        return [_convert.checkpoint(c) for c in resp.checkpoints]

    def export_checkpoint(
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
            self._client._call(self._client._jobs.ExportCheckpoint, req, timeout=timeout)
        )

    def get(self, job_id: str | Job, *, timeout: float | None = None) -> Job:
        """The job's current record: state, progress, parameters, resolved spec."""
        req = training_pb2.GetJobRequest(id=_convert.ref(job_id))
        return _convert.job(self._client._call(self._client._jobs.GetJob, req, timeout=timeout))

    def list(
        self,
        *,
        state: str | JobState | None = None,
        metadata: Mapping[str, str] | None = None,
        page_size: int = 100,
        timeout: float | None = None,
    ) -> Pager[Job]:
        """The caller's jobs (only those in `state` when given), fetched a page at a time."""
        state_pb = _convert.job_state_to_pb(state) if state else 0

        def fetch(token: str) -> Page[Job]:
            req = training_pb2.ListJobsRequest(
                page_size=page_size, page_token=token, state=state_pb, metadata=metadata or {}
            )
            resp = self._client._call(self._client._jobs.ListJobs, req, timeout=timeout)
            return _convert.page([_convert.job(j) for j in resp.jobs], resp.next_page_token)

        return Pager(fetch)

    def cancel(self, job_id: str | Job, *, timeout: float | None = None) -> Job:
        """Asks the job to stop; it checkpoints and ends CANCELLED within seconds."""
        req = training_pb2.CancelJobRequest(id=_convert.ref(job_id))
        return _convert.job(self._client._call(self._client._jobs.CancelJob, req, timeout=timeout))

    def pause(self, job_id: str | Job, *, timeout: float | None = None) -> Job:
        """Checkpoints the job and releases its worker (state PAUSED); `resume` goes on."""
        req = training_pb2.PauseJobRequest(id=_convert.ref(job_id))
        return _convert.job(self._client._call(self._client._jobs.PauseJob, req, timeout=timeout))

    def resume(self, job_id: str | Job, *, timeout: float | None = None) -> Job:
        """Requeues a paused job; it continues from its checkpoint."""
        req = training_pb2.ResumeJobRequest(id=_convert.ref(job_id))
        return _convert.job(self._client._call(self._client._jobs.ResumeJob, req, timeout=timeout))

    def metrics(self, job_id: str | Job, *, timeout: float | None = None) -> list[MetricRow]:
        """Every logged step so far: loss, learning rate, grad norm, tokens/s, val loss."""
        req = training_pb2.GetJobMetricsRequest(id=_convert.ref(job_id))
        stub = self._client._jobs.GetJobMetrics
        rows = self._client._call(lambda r, **kw: list(stub(r, **kw)), req, timeout=timeout)
        return [_convert.metric_row(r) for r in rows]

    def watch(
        self,
        job_id: str | Job,
        *,
        after_event_id: str = "",
        timeout: float | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ) -> Iterator[JobEvent]:
        """The job's events from the start (or after `after_event_id`), then live ones,
        ending with the terminal event.

        A dropped connection or a restarted API server is invisible: the iterator reconnects
        with backoff and resumes after the last event it yielded, for up to
        `reconnect_timeout` seconds without success. `timeout` bounds the whole watch.
        """
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
                for msg in call:
                    event = resume.received(msg)
                    yield event
                    if event.terminal:
                        return
            except grpc.RpcError as e:
                error = e
            finally:
                call.cancel()
            time.sleep(resume.backoff(error))

    def wait(
        self, job_id: str | Job, *, timeout: float | None = None, progress: bool = False
    ) -> Job:
        """Blocks until the job finishes and returns it if it SUCCEEDED.

        Raises `JobFailedError` if it FAILED or was CANCELLED, `WaitTimeoutError` after
        `timeout` seconds (the job keeps running). `progress=True` draws a progress bar on
        stderr: step/total, loss, tokens/s and ETA.
        """
        job = self.get(job_id)
        if not job.done:
            bar = JobProgressBar(job) if progress else None
            try:
                for event in self.watch(job.id, timeout=timeout):
                    if bar:
                        bar.update(event)
            except errors.DeadlineExceededError:
                raise errors.WaitTimeoutError(job.id, timeout or 0.0) from None
            finally:
                if bar:
                    bar.close()
            job = self.get(job.id)
        if job.state is not JobState.SUCCEEDED:
            raise errors.JobFailedError(job)
        return job


class Models(_Resource):
    """Trained models: `client.models`."""

    def list(
        self, *, name: str | None = None, page_size: int = 100, timeout: float | None = None
    ) -> Pager[Model]:
        """The caller's models (only versions of `name` when given), a page at a time."""

        def fetch(token: str) -> Page[Model]:
            req = training_pb2.ListModelsRequest(
                page_size=page_size, page_token=token, name=name or ""
            )
            resp = self._client._call(self._client._models.ListModels, req, timeout=timeout)
            return _convert.page([_convert.model(m) for m in resp.models], resp.next_page_token)

        return Pager(fetch)

    def get(self, model: str | Model, *, timeout: float | None = None) -> Model:
        """By id, "name@version", "name@latest" or "name"."""
        req = training_pb2.GetModelRequest(id=_convert.ref(model))
        return _convert.model(
            self._client._call(self._client._models.GetModel, req, timeout=timeout)
        )

    def delete(self, model: str | Model, *, timeout: float | None = None) -> None:
        """Deletes the model version (NotFoundError if there is none)."""
        req = training_pb2.DeleteModelRequest(id=_convert.ref(model))
        self._client._call(self._client._models.DeleteModel, req, timeout=timeout)

    def download(
        self, model: str | Model, directory: str | os.PathLike, *, timeout: float | None = None
    ) -> list[Path]:
        """Writes the READY model's files into `directory`, each checked against its sha256.

        The directory then opens in `transformers` (config.json, model.safetensors,
        tokenizer.json) and ONNX Runtime (model.onnx). Returns the files written.
        """
        req = training_pb2.DownloadModelRequest(id=_convert.ref(model))
        writer = ModelDirWriter(directory)
        call = self._client._models.DownloadModel(
            req, timeout=timeout, metadata=self._client._config.metadata
        )
        try:
            for chunk in call:
                writer.feed(chunk)
        except grpc.RpcError as e:
            writer.abort()
            raise errors.from_rpc_error(e) from e
        return writer.finish()

    def info(
        self, model: str | Model, *, variant: str = "", timeout: float | None = None
    ) -> ModelInfo:
        """How the inference server serves the model (it loads it if needed)."""
        from lmforge.v1 import inference_pb2

        req = inference_pb2.GetModelInfoRequest(model=_convert.ref(model), variant=variant)
        return _convert.model_info(
            self._client._call(self._client._inference.GetModelInfo, req, timeout=timeout)
        )


class Client:
    """A connection to an lmforge API server and inference server.

    Arguments left None come from LMFORGE_API_ADDR, LMFORGE_INFERENCE_ADDR, LMFORGE_API_KEY
    and LMFORGE_TLS_CA_FILE, then 127.0.0.1:50051 / :50052 without a key or TLS. `timeout`
    is the default deadline of unary calls in seconds (None: no deadline); streams (watch,
    stream, upload) have none unless one is passed to the call. Idempotent calls are retried
    on UNAVAILABLE under `retry`.

        with Client() as client:
            ds = client.datasets.upload("input.txt")
            job = client.jobs.create(dataset=ds, preset="small")
            job = client.jobs.wait(job.id, progress=True)
            print(client.generate(job.model_id, "ROMEO:", max_tokens=50).text)
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
        self._api_channel = _channel(self._config, self._config.api_addr)
        self._inference_channel = _channel(self._config, self._config.inference_addr)
        self._datasets = training_pb2_grpc.DatasetServiceStub(self._api_channel)
        self._jobs = training_pb2_grpc.JobServiceStub(self._api_channel)
        self._models = training_pb2_grpc.ModelServiceStub(self._api_channel)
        self._inference = inference_pb2_grpc.InferenceServiceStub(self._inference_channel)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.models = Models(self)

    @property
    def api_addr(self) -> str:
        return self._config.api_addr

    @property
    def inference_addr(self) -> str:
        return self._config.inference_addr

    def _call(
        self,
        method: Callable[..., Any],
        request: Any,
        *,
        timeout: float | None,
        streaming: bool = False,
    ) -> Any:
        """One call with the deadline, the API key, and retries on UNAVAILABLE; every method
        that goes through here is safe to repeat. `request` may be a factory (for request
        streams, which a retry must produce again)."""
        if timeout is None and not streaming:
            timeout = self._config.timeout
        attempts = Attempts(self._config.retry, timeout)
        while True:
            req = request() if callable(request) else request
            try:
                return method(req, timeout=attempts.remaining(), metadata=self._config.metadata)
            except grpc.RpcError as e:
                time.sleep(attempts.backoff(e))

    def generate(
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
        """Generates a completion of `prompt` with `model` (an id, "name@version" or "name").

        Sampling parameters left None take the server's defaults (64 tokens, temperature 1).
        The same `seed` gives the same text. `n` samples share one prefill (in `choices`);
        `request_id` is echoed back and lets another caller `abort` the request;
        `context_shift` keeps generating past the context by re-reading its recent half;
        `variant` names a graph ("fp32", "int8", "int4") instead of the served default.
        """
        req = _convert.generate_request(
            model, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
            logprobs=logprobs, truncate_prompt=truncate_prompt, n=n, request_id=request_id,
            context_shift=context_shift, variant=variant,
        )  # fmt: skip
        return _convert.completion(self._call(self._inference.Generate, req, timeout=timeout))

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
    ) -> CompletionStream:
        """Like `generate`, but yields text deltas as they are produced.

            with client.stream("shakespeare", "ROMEO:", max_tokens=200) as stream:
                for delta in stream:
                    print(delta.text, end="", flush=True)

        Closing the stream early cancels the generation on the server.
        """
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

        return CompletionStream(start, Deadline(timeout), self._config.retry)

    def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Ends the generation sent with `request_id` (for callers that cannot close its
        stream); True when one of yours was running."""
        req = _convert.abort_request(request_id)
        return self._call(self._inference.Abort, req, timeout=timeout).aborted

    def close(self) -> None:
        self._api_channel.close()
        self._inference_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
