"""WatchJob's core: a job's events on redis.asyncio, so an open watch costs a connection
and a coroutine, never a thread, and a cap on the open watches of each owner.

A watch ends after the terminal event, and also at once when the job is terminal and has
nothing after the given id (a client resuming after the end must not wait forever).

The Redis reads run in a task of their own and the RPC's task waits only on a queue.
grpc.aio ends a call whose client cancelled or went away by cancelling the handler's task
exactly once. On Python < 3.12 `asyncio.wait_for` swallows a cancel that lands just as
the awaitable it wraps completes (cpython#86296), and redis-py sends every command
through `wait_for` when a socket timeout is set: a cancel landing on an XREAD's send was
lost, and the handler went on polling with the owner's slot taken until an event came to
write or the job ended. `Queue.get` never swallows a cancel; the reader stops when told.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import redis.asyncio as aredis

from lmforge_server import errors
from lmforge_server import store as st

# ASCII digits only (`\d` takes any Unicode digit) and no trailing newline (`$` allows one).
EVENT_ID_RE = re.compile(r"\A([0-9]{1,20})-([0-9]{1,20})\Z")
BLOCK_MS = 1000
# Events read ahead of a slow client; the reader waits for room beyond that.
READ_AHEAD = 64
_END = object()
# Readers still running (a task nobody references may be collected mid-read).
_readers: set[asyncio.Task] = set()


def check_event_id(value: str) -> str:
    """A stream id Redis accepts ("<ms>-<seq>", each below 2**64); INVALID_ARGUMENT otherwise."""
    m = EVENT_ID_RE.match(value)
    if value and (not m or max(int(m[1]), int(m[2])) >= 2**64):
        raise errors.InvalidArgument(
            "after_event_id: must be an event id such as '1700000000000-0'"
        )
    return value


class WatchLimiter:
    """Counts the open watches of each owner in this server process."""

    def __init__(self, per_owner: int):
        self.per_owner = per_owner
        self.open: Counter[str] = Counter()

    @contextlib.contextmanager
    def slot(self, owner: str, context=None) -> Iterator[None]:
        """Holds one of `owner`'s watch slots. With a grpc.aio `context`, the slot is also
        given back the moment the RPC ends (cancelled, past its deadline): a handler's
        generator left suspended by a cancel is closed only when it is collected, which
        can be many seconds later, and must not keep the slot until then."""
        if self.open[owner] >= self.per_owner:
            raise errors.ResourceExhausted(
                f"watches: {self.open[owner]} open; the limit per owner is {self.per_owner}"
                " (max_watches_per_owner)"
            )
        self.open[owner] += 1
        held = True

        def release(_context=None) -> None:
            nonlocal held
            if held:
                held = False
                self.open[owner] -= 1
                if not self.open[owner]:
                    del self.open[owner]

        if context is not None:
            context.add_done_callback(release)
        try:
            yield
        finally:
            release()


async def watch(
    limiter: WatchLimiter, r: aredis.Redis, owner: str, job_id: str, after: str, context=None
) -> AsyncIterator[st.JobEvent]:
    """`events` under one of the owner's watch slots. Cancelling the task that iterates
    this ends it at once (slot given back), whatever Redis call the reader is in; the
    reader stops within one XREAD block."""
    with limiter.slot(owner, context):
        stop = asyncio.Event()
        queue: asyncio.Queue = asyncio.Queue(READ_AHEAD)
        reader = asyncio.create_task(_read_into(events(r, job_id, after, stop), queue, stop))
        _readers.add(reader)
        reader.add_done_callback(_readers.discard)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            reader.cancel()


async def _read_into(
    stream: AsyncIterator[st.JobEvent], queue: asyncio.Queue, stop: asyncio.Event
) -> None:
    """Moves `stream` into `queue`, then _END (or the exception that ended it). Its Redis
    read is closed as soon as it stops, never left to the garbage collector."""
    try:
        async with contextlib.aclosing(stream):
            async for ev in stream:
                if stop.is_set():
                    return
                await queue.put(ev)
        item = _END
    except Exception as e:
        item = e
    if not stop.is_set():
        await queue.put(item)


def _event(job_id: str, eid: str, f: dict) -> st.JobEvent:
    return st.JobEvent(
        id=eid,
        job_id=job_id,
        type=f["type"],
        time=float(f["time"]),
        state=f["state"],
        progress=json.loads(f.get("progress") or "{}"),
        message=f.get("message", ""),
        terminal=f.get("terminal") == "1",
    )


async def events(
    r: aredis.Redis, job_id: str, after: str, stop: asyncio.Event | None = None
) -> AsyncIterator[st.JobEvent]:
    """The job's events after `after` ("" = all), live, to the terminal one, or until
    `stop` is set (checked before every read, so a cancel swallowed inside redis-py still
    ends it)."""
    key = f"{st.P}job:{job_id}:events"
    after = after or "0-0"
    block = None  # the first read does not wait: a job that is over ends its watch at once
    while stop is None or not stop.is_set():
        res = await r.xread({key: after}, count=500, block=block)
        block = BLOCK_MS
        entries = res[0][1] if res else []
        for eid, fields in entries:
            ev = _event(job_id, eid, fields)
            yield ev
            after = eid
            if ev.terminal:
                return
        if entries:
            continue
        state = await r.hget(f"{st.P}job:{job_id}", "state")
        if state is None or state in st.TERMINAL:
            # The terminal event is written with the state, in one transaction: nothing
            # after `after` means the client has seen (or skipped) the end (or the job
            # was deleted).
            if not await r.xread({key: after}, count=1):
                return
