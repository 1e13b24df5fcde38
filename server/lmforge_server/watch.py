"""WatchJob's core: a job's events on redis.asyncio, so an open watch costs a connection
and a coroutine, never a thread, and a cap on the open watches of each owner.

A watch ends after the terminal event, and also at once when the job is terminal and has
nothing after the given id (a client resuming after the end must not wait forever).
"""

from __future__ import annotations

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
    def slot(self, owner: str) -> Iterator[None]:
        if self.open[owner] >= self.per_owner:
            raise errors.ResourceExhausted(
                f"watches: {self.open[owner]} open; the limit per owner is {self.per_owner}"
                " (max_watches_per_owner)"
            )
        self.open[owner] += 1
        try:
            yield
        finally:
            self.open[owner] -= 1
            if not self.open[owner]:
                del self.open[owner]


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


async def events(r: aredis.Redis, job_id: str, after: str) -> AsyncIterator[st.JobEvent]:
    """The job's events after `after` ("" = all), live, to the terminal one."""
    key = f"{st.P}job:{job_id}:events"
    after = after or "0-0"
    while True:
        res = await r.xread({key: after}, count=500, block=BLOCK_MS)
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
