"""Replay bounds (issue #10 item 2): a replay shares history, is written in bounded
chunks, is held at most a chunk at a time, and a stalled replay is dropped within
the send timeout.

The RSS test measures this process, so the tests here run one after the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import time
import tracemalloc
from typing import Any

import anyio
import pytest

from sse_broadcaster import BroadcasterConfig, EventBroadcaster, GapError
from sse_broadcaster._metrics import process_memory_mb
from sse_broadcaster._streams import WRITE_CHUNK

from .support.servers import ADAPTERS, established, open_raw, open_silent, serve_adapter, wait_for

pytestmark = pytest.mark.anyio

BIG = "x" * 60_000
EVENT_BYTES = 60_000 + 64  # id: and data: lines around it


def big_config(events: int, **overrides: Any) -> BroadcasterConfig:
    values: dict[str, Any] = {
        "max_history_per_session": events,
        "max_event_bytes": 128 * 1024,
        "max_history_bytes": events * 128 * 1024,
        "max_subscribers_per_session": None,
    }
    values.update(overrides)
    return BroadcasterConfig(**values)


def _trim_heap() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    malloc_trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if malloc_trim is not None:  # glibc
        malloc_trim(0)


# -- the core: shared events, bounded chunks, gaps --------------------------------------------


async def test_replays_share_history_and_copy_nothing_of_it() -> None:
    """200 replays of a 20,000-event history cost 200 cursors, not 200 lists of it."""
    async with EventBroadcaster(big_config(20_000)) as broadcaster:
        history = [await broadcaster.publish("room", "x") for _ in range(20_000)]
        subs = []
        async with contextlib.AsyncExitStack() as stack:
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for _ in range(200):
                    sub = broadcaster.subscribe("room", last_event_id="bogus")
                    subs.append(await stack.enter_async_context(sub))
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            # Before: a deque of the whole replay per subscriber, about 32 MB here.
            assert grown < 2 * 2**20, f"200 replays allocated {grown / 2**20:.1f} MB"
            assert all(sub.gap and sub.replayed == 20_000 for sub in subs)
            received = [await subs[0].receive() for _ in range(20_000)]
            assert all(a is b for a, b in zip(received, history, strict=True))


@pytest.mark.parametrize("max_queue_bytes", [128 * 1024, 2**20])
async def test_a_replay_is_held_one_chunk_at_a_time(max_queue_bytes: int) -> None:
    async with EventBroadcaster(big_config(100, max_queue_bytes=max_queue_bytes)) as broadcaster:
        events = [await broadcaster.publish("room", BIG) for _ in range(100)]
        async with broadcaster.subscribe("room", last_event_id=events[0].id) as sub:
            assert sub.replayed == 99
            assert sub.queued == 99
            received = []
            while len(received) < 99:
                received.append(await sub.receive())
                held = sum(event.size for event in sub._batch or ())
                # At most a 64 KiB chunk of history, or one event when it is larger.
                assert held <= max(min(65_536, max_queue_bytes), EVENT_BYTES)
            assert received == events[1:]
            assert sub.queued == 0


async def test_batches_are_capped_in_bytes_and_keep_order() -> None:
    async with EventBroadcaster(big_config(50)) as broadcaster:
        replayed = [await broadcaster.publish("room", BIG) for _ in range(20)]
        async with broadcaster.subscribe("room", last_event_id="bogus") as sub:
            live = [await broadcaster.publish("room", "small") for _ in range(3)]
            batches = []
            while sub.queued:
                batches.append(await sub.receive_batch(max_bytes=150_000))
            # Two 60 kB events per batch; the live events join the replay's last.
            assert [len(batch) for batch in batches] == [2] * 9 + [5]
            assert [e for batch in batches for e in batch] == replayed + live
            one = await broadcaster.publish("room", BIG)
            assert await sub.receive_batch(max_bytes=10) == [one]  # at least one event
        with pytest.raises(ValueError, match="max_bytes must be None or >= 1, got 0"):
            await sub.receive_batch(max_bytes=0)


async def test_live_batches_under_the_cap_are_taken_whole() -> None:
    async with EventBroadcaster() as broadcaster, broadcaster.subscribe("room") as sub:
        events = [await broadcaster.publish("room", str(i)) for i in range(100)]
        assert await sub.receive_batch(max_bytes=WRITE_CHUNK) == events
        more = [await broadcaster.publish("room", "y" * 1000) for i in range(100)]
        first = sub.drain_nowait(max_bytes=WRITE_CHUNK)
        assert sum(e.size for e in first) <= WRITE_CHUNK
        assert first + sub.drain_nowait() == more


async def test_a_replay_overtaken_by_eviction_ends_with_a_gap_never_a_hole() -> None:
    """History evicts events a slow replay has not taken yet: the subscriber gets
    what precedes the hole, then GapError, and nothing after it; resuming from its
    last id is a gap."""
    async with EventBroadcaster(big_config(10)) as broadcaster:
        # 60 kB events: each is a chunk of its own, taken when received.
        first = [await broadcaster.publish("room", BIG) for _ in range(10)]
        async with broadcaster.subscribe("room", last_event_id=first[0].id) as sub:
            got = [await sub.receive() for _ in range(2)]
            assert got == first[1:3]
            for i in range(10):  # evicts every event the replay has not taken yet
                await broadcaster.publish("room", f"new {i}")

            async def receive_all() -> None:
                with anyio.fail_after(5):  # before the fix: every event, then waits forever
                    while True:
                        got.append(await sub.receive())

            with pytest.raises(GapError, match=r"fell behind its history: event \w+-4 was evicted"):
                await receive_all()
            assert got == first[1:3]  # the live events after the hole were not delivered
        async with broadcaster.subscribe("room", last_event_id=got[-1].id) as again:
            assert again.gap
            assert again.replayed == 10


async def test_a_closed_session_still_sends_its_pending_replay() -> None:
    async with EventBroadcaster(big_config(100)) as broadcaster:
        events = [await broadcaster.publish("room", BIG) for _ in range(10)]
        async with broadcaster.subscribe("room", last_event_id="bogus") as sub:
            live = await broadcaster.publish("room", "live")
            await broadcaster.close_session("room")
            assert [event async for event in sub] == [*events, live]


# -- real servers: the writes and the send timeout ---------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn and aiohttp: asyncio only
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_large_replay_is_written_in_bounded_writes(adapter: str) -> None:
    broadcaster = EventBroadcaster(big_config(100))
    async with serve_adapter(adapter, broadcaster) as served:
        events = [await broadcaster.publish("room", BIG) for _ in range(100)]
        headers = {"Last-Event-ID": events[0].id}
        async with open_raw(served.base_url, "/events/room", headers) as raw:
            sizes = []
            received = b""
            while received.count(b"\nid: ") + received.startswith(b"id: ") < 99:
                chunk = await raw.read_chunk()
                sizes.append(len(chunk))
                received += chunk
        # Each write is one HTTP chunk. Before: the whole 6 MB replay in one.
        assert max(sizes) <= WRITE_CHUNK + EVENT_BYTES, sizes
        assert received.endswith(events[-1].encode())


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_stalled_replay_is_dropped_within_the_send_timeout(adapter: str) -> None:
    """Clients that never read a 12 MB replay: dropped within the send timeout, not at
    the next keep-alive a minute later, and not holding the replay meanwhile."""
    clients, send_timeout = 10, 0.5
    broadcaster = EventBroadcaster(
        big_config(200, send_timeout=send_timeout, keepalive_interval=60.0)
    )
    async with serve_adapter(adapter, broadcaster) as served, contextlib.AsyncExitStack() as stack:
        for _ in range(200):
            await broadcaster.publish("room", BIG)
        _trim_heap()
        rss_before = process_memory_mb()
        start = time.monotonic()
        socks = []
        for _ in range(clients):
            sock = await open_silent(served.base_url, "/events/room?lastEventId=bogus")
            stack.callback(sock.close)
            socks.append(sock)
        await wait_for(
            lambda: broadcaster.stats()["totalSubscribers"] == clients, 10, "the streams to open"
        )
        await anyio.sleep(send_timeout / 4)
        _trim_heap()
        # Before: every stream held its whole 12 MB replay, joined (over 120 MB).
        grown = process_memory_mb() - rss_before
        assert grown < 40, f"RSS grew {grown:.1f} MB with {clients} stalled replays"
        await wait_for(
            lambda: broadcaster.stats()["totalSubscribers"] == 0,
            3 * send_timeout + 2,
            "the stalled streams to be dropped",
        )
        took = time.monotonic() - start
        # The server's side of each connection is aborted, the clients still there.
        await wait_for(lambda: established(served.base_url) == 0, 5, "the sockets to close")
    # Generous: opening ten connections on a loaded machine takes time too.
    assert took <= 3 * send_timeout + 1.5, f"dropped after {took:.1f} s"
