"""What the console and the OpenAI endpoints both do over gRPC: upload a corpus, read a
job's events so far, list every page, and stream a generation. No HTTP shapes here."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import IO, Any

import grpc

from lmforge.v1 import training_pb2
from lmforge_server.http.errors import HTTPError
from lmforge_server.http.upstream import UNARY_TIMEOUT_S, Upstream

CHUNK_BYTES = 1 << 20
PAGE_SIZE = 200
# Events already stored come back at once; this long without one means "no more for now".
EVENTS_QUIET_S = 0.5


async def spool(chunks: AsyncIterator[bytes], limit: int) -> tuple[IO[bytes], str, int]:
    """The request body in a temporary file, with its sha256 and size (the upload's header
    needs the hash before the first chunk). More than `limit` bytes is a 413."""
    f = tempfile.SpooledTemporaryFile(max_size=8 << 20)
    digest, size = hashlib.sha256(), 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            f.close()
            raise HTTPError(413, f"file: larger than the limit of {limit} bytes", param="file")
        digest.update(chunk)
        f.write(chunk)
    f.seek(0)
    return f, digest.hexdigest(), size


async def upload_dataset(
    up: Upstream, md, name: str, f: IO[bytes], sha256: str, size: int
) -> training_pb2.Dataset:
    """UploadDataset from a spooled file: the header, then the bytes in chunks."""

    async def requests():
        header = training_pb2.UploadDatasetHeader(name=name, sha256=sha256, size_bytes=size)
        yield training_pb2.UploadDatasetRequest(header=header)
        while chunk := f.read(CHUNK_BYTES):
            yield training_pb2.UploadDatasetRequest(chunk=chunk)

    return await up.datasets.UploadDataset(requests(), metadata=md, timeout=600)


async def _every_page(method: Callable[..., Awaitable[Any]], request, md, field: str) -> list:
    """All items of a paged List call, fetching page after page."""
    items = []
    while True:
        resp = await method(request, metadata=md, timeout=UNARY_TIMEOUT_S)
        items.extend(getattr(resp, field))
        if not resp.next_page_token:
            return items
        request.page_token = resp.next_page_token


async def list_jobs(up: Upstream, md, state: int = 0) -> list[training_pb2.Job]:
    req = training_pb2.ListJobsRequest(page_size=PAGE_SIZE, state=state)
    return await _every_page(up.jobs.ListJobs, req, md, "jobs")


async def list_datasets(up: Upstream, md) -> list[training_pb2.Dataset]:
    req = training_pb2.ListDatasetsRequest(page_size=PAGE_SIZE)
    return await _every_page(up.datasets.ListDatasets, req, md, "datasets")


async def list_models(up: Upstream, md) -> list[training_pb2.Model]:
    req = training_pb2.ListModelsRequest(page_size=PAGE_SIZE)
    return await _every_page(up.models.ListModels, req, md, "models")


async def events_so_far(up: Upstream, md, job_id: str) -> list[training_pb2.JobEvent]:
    """The job's stored events: WatchJob until the terminal event or a quiet moment."""
    call = up.jobs.WatchJob(training_pb2.WatchJobRequest(id=job_id), metadata=md)
    events = []
    try:
        while True:
            try:
                msg = await _next(call, EVENTS_QUIET_S)
            except TimeoutError:
                return events
            if msg is None:
                return events
            events.append(msg)
            if msg.terminal:
                return events
    finally:
        call.cancel()


async def _next(call, timeout: float):
    msg = await asyncio.wait_for(call.read(), timeout)
    return None if msg is grpc.aio.EOF else msg


async def get_job(up: Upstream, md, job_id: str) -> training_pb2.Job:
    return await up.jobs.GetJob(
        training_pb2.GetJobRequest(id=job_id), metadata=md, timeout=UNARY_TIMEOUT_S
    )
