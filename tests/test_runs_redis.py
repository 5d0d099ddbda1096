"""Resumable runs (#13) on RedisBackend: runs shared by processes through Redis.

In-process cases use two broadcasters on one Redis (two "processes" sharing
nothing but Redis); the kill -9 case runs tests/support/redis_node.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from sse_broadcaster import (
    BroadcasterConfig,
    Event,
    EventBroadcaster,
    RunActiveError,
    RunState,
)
from sse_broadcaster.redis import RedisBackend
from tests.test_redis import Node, node

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def prefix() -> str:
    return f"r{uuid.uuid4().hex[:10]}"


def on(url: str, prefix: str, **config: Any) -> EventBroadcaster:
    options: dict[str, Any] = {"run_heartbeat_timeout": 1.0, "cleanup_interval": 0.2}
    options.update(config)
    backend = RedisBackend(url, prefix=prefix, min_backoff=0.02, max_backoff=0.2)
    return EventBroadcaster(BroadcasterConfig(**options), backend=backend)


async def paced(n: int, pause: float = 0.002) -> AsyncIterator[str]:
    for i in range(n):
        yield f"t{i}"
        await anyio.sleep(pause)


async def read_run(b: EventBroadcaster, session: str, last: str | None = None) -> list[Event]:
    with anyio.fail_after(30):
        async with b.subscribe(session, last_event_id=last, until_end=True) as sub:
            return [event async for event in sub]


async def wait_ended(b: EventBroadcaster, session: str) -> Any:
    with anyio.fail_after(30):
        while True:
            info = await b.run_info(session)
            if info is not None and info.ended:
                return info
            await anyio.sleep(0.01)


async def test_a_run_started_on_a_is_followed_and_resumed_on_b(
    redis_server: str, prefix: str
) -> None:
    async with on(redis_server, prefix) as a, on(redis_server, prefix) as b:
        await a.publish("s", "before")
        info = await a.start_run("s", paced(60))
        remote = await b.run_info("s")
        assert remote is not None
        assert remote.run_id == info.run_id
        assert remote.state is RunState.RUNNING
        full = await read_run(b, "s")  # from the run's first event
        assert [e.data for e in full[:-1]] == [f"t{i}" for i in range(60)]
        assert json.loads(full[-1].data) == {
            "state": "finished",
            "runId": info.run_id,
            "events": 60,
        }
        for cut in (0, 17, 59):
            rest = await read_run(b, "s", full[cut].id)
            assert [e.id for e in rest] == [e.id for e in full[cut + 1 :]]
        done = await wait_ended(b, "s")
        assert done.end_event_id == full[-1].id
        assert done.retained


async def test_the_transcript_is_not_trimmed_by_history_limits(
    redis_server: str, prefix: str
) -> None:
    small = {"max_history_per_session": 5, "event_ttl": 0.3}
    async with on(redis_server, prefix, **small) as a, on(redis_server, prefix, **small) as b:
        await a.start_run("s", paced(40))
        await wait_ended(a, "s")
        await anyio.sleep(0.5)  # past event_ttl
        events = await read_run(b, "s")
        assert [e.data for e in events[:-1]] == [f"t{i}" for i in range(40)]


async def test_a_second_start_on_b_is_refused_while_a_runs(redis_server: str, prefix: str) -> None:
    release = anyio.Event()

    async def waiting() -> AsyncIterator[str]:
        yield "w"
        await release.wait()

    async with on(redis_server, prefix) as a, on(redis_server, prefix) as b:
        info = await a.start_run("s", waiting())
        with pytest.raises(RunActiveError, match=info.run_id):
            await b.start_run("s", paced(1))
        release.set()
        await wait_ended(b, "s")
        second = await b.start_run("s", paced(2))
        assert second.run_id != info.run_id


async def test_cancel_from_b_stops_the_generator_on_a(redis_server: str, prefix: str) -> None:
    cleaned = anyio.Event()
    started = anyio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            yield "first"
            started.set()
            await anyio.sleep_forever()
        finally:
            cleaned.set()

    async with on(redis_server, prefix) as a, on(redis_server, prefix) as b:
        info = await a.start_run("s", endless())
        await started.wait()
        async with (
            a.subscribe("s", until_end=True) as on_a,
            b.subscribe("s", until_end=True) as on_b,
        ):
            assert await b.cancel_run("s")
            with anyio.fail_after(10):
                await cleaned.wait()
                seen_a = [e async for e in on_a]
                seen_b = [e async for e in on_b]
        assert seen_a == seen_b
        assert json.loads(seen_b[-1].data)["state"] == "cancelled"
        assert json.loads(seen_b[-1].data)["runId"] == info.run_id
        assert (await wait_ended(b, "s")).state is RunState.CANCELLED
        assert not await b.cancel_run("s")


async def test_a_dead_producer_ends_failed_once(redis_server: str, prefix: str) -> None:
    async with on(redis_server, prefix) as b, on(redis_server, prefix) as c:
        # A run claimed by a producer that never beats (as if killed at once).
        store = b._backend.run_store()  # type: ignore[attr-defined]
        await store.claim("s", "gone", 0.0)
        await b.publish("s", "partial")
        async with b.subscribe("s", until_end=True) as sub:
            with anyio.fail_after(15):
                events = [e async for e in sub]
        ends = [e for e in events if e.event == "end"]
        assert len(ends) == 1
        assert json.loads(ends[0].data)["state"] == "failed"
        await anyio.sleep(0.5)  # both sweepers ran again: still one end
        history = await c.history("s")
        assert [e.event for e in history].count("end") == 1
        assert (await c.run_info("s")).state is RunState.FAILED  # type: ignore[union-attr]


async def test_run_ttl_unpins_the_transcript(redis_server: str, prefix: str) -> None:
    config = {"run_ttl": 0.3, "max_history_per_session": 3}
    raw = aioredis.Redis.from_url(redis_server)
    try:
        async with on(redis_server, prefix, **config) as a:
            await a.start_run("s", paced(10, 0))
            await wait_ended(a, "s")
            assert await raw.xlen(f"{prefix}:s:s") == 11
            with anyio.fail_after(10):
                while (info := await a.run_info("s")) is not None and info.retained:
                    await anyio.sleep(0.05)
            assert info is not None
            assert not info.retained
            assert await raw.xlen(f"{prefix}:s:s") == 3
            assert a.stats()["runs"]["expired"] >= 1
    finally:
        await raw.aclose()


# -- two OS processes (tests/support/redis_node.py) ---------------------------------------------

NODE_CONFIG = {"config": {"run_heartbeat_timeout": 1.0, "cleanup_interval": 0.2}}


@asynccontextmanager
async def killable_node(url: str, prefix: str) -> AsyncIterator[Node]:
    """A node the test may SIGKILL: only its failed ``quit`` at teardown is let pass."""
    try:
        async with node(url, prefix, **NODE_CONFIG) as n:
            yield n
    except Exception as exc:
        if not _only_broken_pipe(exc):
            raise


def _only_broken_pipe(exc: BaseException) -> bool:
    nested = getattr(exc, "exceptions", None)
    if nested is not None:
        return all(_only_broken_pipe(e) for e in nested)
    return isinstance(exc, anyio.BrokenResourceError)


async def test_two_processes_follow_cancel_refuse_and_kill(redis_server: str, prefix: str) -> None:
    async with (
        killable_node(redis_server, prefix) as a,
        node(redis_server, prefix, **NODE_CONFIG) as b,
    ):
        # Start on A, follow on B; a second start on B is refused.
        await a.send(op="start_run", tag="r1", session="s", count=None, interval=0.01)
        await a.wait(lambda: a.of("r1", "started"))
        await b.send(op="subscribe", tag="f1", session="s", until_end=True)
        await b.wait(lambda: len(b.events("f1")) >= 5)
        await b.send(op="start_run", tag="r2", session="s", count=3)
        await b.wait(lambda: b.of("r2", "refused"))
        assert b.of("r2", "refused")[0]["error"] == "RunActiveError"
        # Cancel from B stops the generator on A; both ends say cancelled.
        await a.send(op="subscribe", tag="f2", session="s", until_end=True)
        await a.wait(lambda: a.of("f2", "entered"))
        await b.send(op="cancel_run", tag="c", session="s")
        await b.wait(lambda: b.of("c", "cancelled"))
        assert b.of("c", "cancelled")[0]["result"] is True
        await a.wait(lambda: a.of("r1", "finally"))
        await b.wait(lambda: b.of("f1", "end"))
        await a.wait(lambda: a.of("f2", "end"))
        ends = [r for r in b.of("f1", "event") if r["event"] == "end"]
        assert json.loads(ends[-1]["data"])["state"] == "cancelled"
        assert a.of("f2", "event")[-1]["id"] == ends[-1]["id"]
        ids = b.events("f1")
        assert len(ids) == len(set(ids))
        # A new run on A, killed with SIGKILL mid-run: B's reader gets `failed`.
        await a.send(op="start_run", tag="r3", session="s", count=None, interval=0.01)
        await a.wait(lambda: a.of("r3", "started"))
        await b.send(op="subscribe", tag="f3", session="s", until_end=True)
        await b.wait(lambda: len(b.events("f3")) >= 3)
        a.process.kill()
        killed = anyio.current_time()
        await b.wait(lambda: b.of("f3", "end"), within=15)
        detected = anyio.current_time() - killed
        last = b.of("f3", "event")[-1]
        assert last["event"] == "end"
        assert json.loads(last["data"])["state"] == "failed"
        assert detected < 10  # heartbeat timeout 1 s + sweeps every 0.2 s, generous
        print(f"\n[redis-figures] run-producer-kill: detected_after_s={detected:.2f}")
