"""WatchJob's core (lmforge_server.watch) against a real Redis: a watch whose task is
cancelled ends and gives its slot back even when the Redis client loses the cancel, and a
Redis failure in the middle of a watch reaches the caller."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aredis
import redis.exceptions

from lmforge_server import store as st
from lmforge_server import watch

JOB = "job_0123456789abcdef"


class CancelLosingRedis(aredis.Redis):
    """redis.asyncio as it behaves on Python < 3.12 when a cancel lands while a command is
    being sent (redis-py's asyncio.wait_for returns the finished send and drops the cancel,
    cpython#86296), made certain: every cancel inside a command is dropped."""

    lost = 0
    losing = True

    async def execute_command(self, *args, **options):
        try:
            return await super().execute_command(*args, **options)
        except asyncio.CancelledError:
            if not self.losing:
                raise
            self.lost += 1
            return None


async def _running_job(r: aredis.Redis) -> None:
    await r.hset(f"{st.P}job:{JOB}", "state", "RUNNING")
    await r.xadd(
        f"{st.P}job:{JOB}:events",
        {"type": "STATE", "state": "RUNNING", "time": "1.0", "progress": "{}", "terminal": "0"},
    )


async def _open_watch(limiter, r) -> tuple[asyncio.Task, asyncio.Queue]:
    """A watch of JOB in a task of its own, once it has delivered the first event."""
    got: asyncio.Queue = asyncio.Queue()

    async def client():
        async for ev in watch.watch(limiter, r, "alice", JOB, ""):
            got.put_nowait(ev)

    task = asyncio.create_task(client())
    first = await asyncio.wait_for(got.get(), 10)
    assert first.state == "RUNNING"
    return task, got


async def _readers_stopped(seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while watch._readers and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return not watch._readers


def test_a_cancelled_watch_ends_and_frees_its_slot_when_redis_loses_the_cancel(redis_server):
    async def main():
        r = CancelLosingRedis.from_url(redis_server.url, decode_responses=True)
        await _running_job(r)
        limiter = watch.WatchLimiter(per_owner=1)
        task, _ = await _open_watch(limiter, r)
        try:
            await asyncio.sleep(0.2)  # idle in its XREAD BLOCK, as an idle watch is
            # grpc.aio cancels a call's task once, when the client cancels or goes away.
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=10)
            assert task in done and task.cancelled(), "the watch went on after its cancel"
            assert limiter.open == {}
            # The Redis read stops too, though the client dropped the cancel it was sent.
            assert await _readers_stopped(10)
            assert r.lost >= 1  # the case under test: a cancel was lost inside redis-py
        finally:
            r.losing = False  # a failed run must not leave tasks that nothing can cancel
            for t in (task, *watch._readers):
                t.cancel()
            await r.aclose()

    asyncio.run(main())


def test_redis_failing_in_the_middle_of_a_watch_reaches_the_caller(redis_server):
    async def main():
        r = aredis.Redis.from_url(redis_server.url, decode_responses=True)
        await _running_job(r)
        limiter = watch.WatchLimiter(per_owner=1)
        task, _ = await _open_watch(limiter, r)
        await asyncio.get_running_loop().run_in_executor(None, redis_server.stop)
        done, _ = await asyncio.wait({task}, timeout=20)
        assert task in done
        # The interceptor maps a RedisError to UNAVAILABLE.
        with pytest.raises(redis.exceptions.RedisError):
            task.result()
        assert limiter.open == {}
        assert await _readers_stopped(10)
        await r.aclose()

    asyncio.run(main())
