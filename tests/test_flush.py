"""The flush of a session's streams on real servers: how many writes a burst takes.

Each write of an adapter is one HTTP chunk on the wire, so a client that
parses the chunks counts the writes a stream received. The clients run in a
process of their own (tests/support/chunk_counter.py), so that they cost the
server's event loop nothing; every test runs on uvicorn (Starlette adapter)
and on aiohttp's own server.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from sse_broadcaster import BroadcasterConfig, EventBroadcaster

from .support.servers import ADAPTERS, serve_adapter, wait_for

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and aiohttp run on asyncio only


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def read_line(stream: anyio.abc.ByteReceiveStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        data += await stream.receive(1)
    return data.decode().strip()


async def count_writes(
    adapter: str,
    streams: int,
    events: int,
    publish: Callable[[EventBroadcaster], Awaitable[None]],
    **options: float,
) -> list[int]:
    """Serve `streams` clients and let `publish` send `events` events to them;
    the writes (chunks) each stream took for them."""
    broadcaster = EventBroadcaster(
        BroadcasterConfig(keepalive_interval=30.0, send_timeout=10.0, retry_ms=None)
    )
    async with serve_adapter(adapter, broadcaster, **options) as served:
        command = [sys.executable, "-m", "tests.support.chunk_counter"]
        args = [served.url("/events/room"), str(streams), str(events)]
        async with await anyio.open_process([*command, *args], cwd=ROOT) as process:
            assert process.stdout is not None
            with anyio.fail_after(30):
                assert await read_line(process.stdout) == "ready"
                await wait_for(lambda: broadcaster.subscriber_count("room") == streams, 10)
                await publish(broadcaster)
                line = await read_line(process.stdout)
            assert await process.wait() == 0
    writes = json.loads(line)
    assert len(writes) == streams
    return [int(n) for n in writes]


async def test_a_burst_into_many_streams_takes_few_writes(adapter: str) -> None:
    # 300 events published one per loop iteration into 1,000 streams, with the
    # shipped window (1 ms). A fan-out of 300 writes takes longer than the
    # window, and the publisher's turn falls in the middle of it: the streams
    # written after it carry the new event, those before it wake for that
    # event alone. Those must hold the session's flush as well, and a hold
    # must last as long as the fan-out before it took. Before both, most
    # writes carried one event (120-160 writes per stream here).
    async def burst(broadcaster: EventBroadcaster) -> None:
        for i in range(300):
            await broadcaster.publish("room", f"event {i}")
            await anyio.lowlevel.checkpoint()

    writes = await count_writes(adapter, 1000, 300, burst)
    mean = sum(writes) / len(writes)
    assert mean <= 300 / 10, f"{mean:.1f} writes per stream for 300 events"


async def test_events_published_apart_go_out_one_write_each(adapter: str) -> None:
    # Paced events to the same number of streams: each is its own write, none
    # is held back for a next one (a hold ends after two quiet iterations, and
    # a paced event is no burst).
    async def paced(broadcaster: EventBroadcaster) -> None:
        for i in range(5):
            await broadcaster.publish("room", f"paced {i}")
            await anyio.sleep(0.1)

    writes = await count_writes(adapter, 300, 5, paced)
    assert writes == [5] * 300
