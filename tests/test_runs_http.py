"""Following a resumable run over HTTP (#13 item 4): `follow_run` on real servers.

Each rule of docs/runs.md "Over HTTP" on plain ASGI and Starlette (uvicorn) and
on aiohttp, read with httpx and with our own `sse_broadcaster.client.EventSource`;
then the FastAPI example of docs/runs.md, which is tests/apps/runs_fastapi.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from sse_broadcaster import BroadcasterConfig, Event, EventBroadcaster, RunState
from sse_broadcaster.backends import MemoryBackend
from sse_broadcaster.client import EventSource

from .support.clock import FakeClock
from .support.servers import run_aiohttp, run_uvicorn
from .support.sse_parser import ParsedEvent, SSEParser, parse

pytestmark = pytest.mark.anyio

ADAPTERS = ["asgi", "starlette", "aiohttp"]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "runs.md"
APP = Path(__file__).resolve().parent / "apps" / "runs_fastapi.py"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and aiohttp run on asyncio only


Message = MutableMapping[str, Any]


def _asgi_app(broadcaster: EventBroadcaster) -> Any:
    from sse_broadcaster.asgi import follow_run, lifespan

    async def app(
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            await receive()
            async with lifespan(broadcaster)(None):
                await send({"type": "lifespan.startup.complete"})
                await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        session_id = scope["path"].removeprefix("/runs/").removesuffix("/events")
        await (await follow_run(broadcaster, session_id, scope))(scope, receive, send)

    return app


def _starlette_app(broadcaster: EventBroadcaster) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from sse_broadcaster.starlette import follow_run, lifespan

    async def events(request: Request) -> Response:
        return await follow_run(broadcaster, request.path_params["run"], request)

    return Starlette(routes=[Route("/runs/{run}/events", events)], lifespan=lifespan(broadcaster))


def _aiohttp_app(broadcaster: EventBroadcaster) -> Any:
    from aiohttp import web

    from sse_broadcaster.aiohttp import follow_run, setup

    async def events(request: web.Request) -> web.StreamResponse:
        return await follow_run(broadcaster, request.match_info["run"], request)

    app = web.Application()
    app.router.add_get("/runs/{run}/events", events)
    setup(app, broadcaster)
    return app


@asynccontextmanager
async def serve(adapter: str, broadcaster: EventBroadcaster) -> AsyncIterator[httpx.AsyncClient]:
    """The adapter's app on a real server; yields an httpx client on its base URL."""
    if adapter == "aiohttp":
        server = run_aiohttp(_aiohttp_app(broadcaster))
    else:
        app = _asgi_app(broadcaster) if adapter == "asgi" else _starlette_app(broadcaster)
        server = run_uvicorn(app)
    async with (
        server as running,
        httpx.AsyncClient(base_url=running.base_url, timeout=10) as client,
    ):
        yield client


async def tokens(count: int, gate: anyio.Event | None = None, at: int = 0) -> AsyncIterator[Any]:
    """`count` tokens; with a `gate`, the run waits for it before token `at`."""
    for i in range(count):
        if gate is not None and i == at:
            await gate.wait()
        yield {"text": f"t{i}"}


async def finished(broadcaster: EventBroadcaster, session_id: str) -> list[Event]:
    """Wait for the session's run to end; its transcript (the end marker last)."""
    with anyio.fail_after(10):
        while True:
            info = await broadcaster.run_info(session_id)
            assert info is not None
            if info.ended:
                return await broadcaster.history(session_id)
            await anyio.sleep(0.01)


async def get(client: httpx.AsyncClient, path: str, last_id: str | None = None) -> httpx.Response:
    """A GET that reads the whole body: a run's stream ends after its end marker."""
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    with anyio.fail_after(15):
        return await client.get(path, headers=headers)


def ids(events: list[ParsedEvent]) -> list[str]:
    return [e.last_event_id for e in events if e.type != "gap"]


def wire_ids(events: list[Event]) -> list[str]:
    return [e.id for e in events]


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_no_run_is_404_and_a_bad_session_id_400(adapter: str) -> None:
    broadcaster = EventBroadcaster()
    async with serve(adapter, broadcaster) as client:
        await broadcaster.publish("plain", "not a run")
        for session_id in ("nothing", "plain"):
            answer = await get(client, f"/runs/{session_id}/events")
            assert answer.status_code == 404
            assert answer.text == f"no run on this session: {session_id!r}"
        answer = await get(client, "/runs/a%01b/events")
        assert answer.status_code == 400
        assert answer.text.startswith("invalid session id: session_id must not contain control")
        assert await broadcaster.run_info("nothing") is None  # nothing was started


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_finished_run_whole_rest_and_204_after_the_end(adapter: str) -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=1500))
    async with serve(adapter, broadcaster) as client:
        await broadcaster.publish("r", "before the run")  # not part of the run
        await broadcaster.start_run("r", tokens(20), event="token")
        transcript = (await finished(broadcaster, "r"))[1:]
        assert len(transcript) == 21

        # No id (a second tab, a reload of a page that kept nothing): the whole run.
        whole = await get(client, "/runs/r/events")
        assert whole.status_code == 200
        assert whole.headers["content-type"] == "text/event-stream; charset=utf-8"
        events = parse(whole.content)
        assert ids(events) == wire_ids(transcript)
        assert [e.data for e in events[:2]] == ['{"text":"t0"}', '{"text":"t1"}']
        assert events[-1].type == "end"
        end = json.loads(events[-1].data)
        assert end["state"] == "finished"
        assert end["events"] == 20
        assert whole.content.startswith(b"retry: 1500\n\n")

        # An id inside the run: exactly the rest, then the stream ends.
        rest = await get(client, "/runs/r/events", transcript[7].id)
        assert rest.status_code == 200
        assert ids(parse(rest.content)) == wire_ids(transcript[8:])

        # The end marker's id, as a browser reconnects after the stream ended: 204.
        after = await get(client, "/runs/r/events", transcript[-1].id)
        assert after.status_code == 204
        assert after.content == b""
        # The query parameter of EventSource polyfills counts as the header does.
        after = await get(client, f"/runs/r/events?lastEventId={transcript[-1].id}")
        assert after.status_code == 204


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_resume_inside_a_running_run_gets_the_rest_then_live_then_ends(
    adapter: str,
) -> None:
    broadcaster = EventBroadcaster()
    gate = anyio.Event()
    async with serve(adapter, broadcaster) as client:
        await broadcaster.start_run("live", tokens(30, gate, at=10), event="token")
        with anyio.fail_after(10):
            while len(await broadcaster.history("live")) < 10:
                await anyio.sleep(0.01)
        first_ten = await broadcaster.history("live")
        received: list[ParsedEvent] = []
        parser = SSEParser()
        with anyio.fail_after(15):
            async with client.stream(
                "GET", "/runs/live/events", headers={"Last-Event-ID": first_ten[3].id}
            ) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_bytes():
                    received += parser.feed(chunk)
                    if len(received) == 6 and not gate.is_set():
                        gate.set()  # the rest of the run comes live
                # The stream ended by itself, right after the end marker.
        transcript = await finished(broadcaster, "live")
        assert ids(received) == wire_ids(transcript[4:])
        assert received[-1].type == "end"


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_cancel_ends_every_follower_and_their_streams(adapter: str) -> None:
    broadcaster = EventBroadcaster()
    never = anyio.Event()
    async with serve(adapter, broadcaster) as client:
        await broadcaster.start_run("stop", tokens(10, never, at=5), event="token")
        results: list[list[ParsedEvent]] = []

        async def follow() -> None:
            response = await get(client, "/runs/stop/events")
            results.append(parse(response.content))

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(follow)
            task_group.start_soon(follow)
            with anyio.fail_after(10):
                while broadcaster.stats()["totalSubscribers"] < 2:
                    await anyio.sleep(0.01)
            assert await broadcaster.cancel_run("stop")
        transcript = await finished(broadcaster, "stop")
        assert len(results) == 2
        for events in results:
            assert ids(events) == wire_ids(transcript)
            assert json.loads(events[-1].data)["state"] == "cancelled"
        info = await broadcaster.run_info("stop")
        assert info is not None
        assert info.state is RunState.CANCELLED
        answer = await get(client, "/runs/stop/events", info.end_event_id)
        assert answer.status_code == 204


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_an_expired_run_says_so_once_and_is_never_restarted(adapter: str) -> None:
    clock = FakeClock()
    broadcaster = EventBroadcaster(BroadcasterConfig(run_ttl=10, retry_ms=700), clock=clock)
    async with serve(adapter, broadcaster) as client:
        await broadcaster.start_run("old", tokens(5), event="token")
        transcript = await finished(broadcaster, "old")
        clock.advance(11)
        await broadcaster.cleanup()
        info = await broadcaster.run_info("old")
        assert info is not None
        assert not info.retained

        for last_id in (transcript[2].id, None):
            answer = await get(client, "/runs/old/events", last_id)
            assert answer.status_code == 200
            assert answer.content.startswith(b"retry: 700\n\n")
            gap, end = parse(answer.content)
            assert gap.type == "gap"
            assert json.loads(gap.data) == {"lastEventId": last_id, "replayed": 0, "expired": True}
            assert end.type == "end"
            assert end.last_event_id == transcript[-1].id  # the browser comes back with it ...
            assert json.loads(end.data) == {
                "state": "finished",
                "runId": info.run_id,
                "events": 5,
                "expired": True,
            }
        # ... and is told to stop.
        assert (await get(client, "/runs/old/events", end.last_event_id)).status_code == 204
        after = await broadcaster.run_info("old")
        assert after == info  # nothing was started
        assert broadcaster.stats()["runs"]["started"] == 1


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_an_id_of_an_earlier_run_gets_a_gap_then_the_current_run(adapter: str) -> None:
    broadcaster = EventBroadcaster()
    async with serve(adapter, broadcaster) as client:
        await broadcaster.start_run("s", tokens(4), event="token")
        first = await finished(broadcaster, "s")
        await broadcaster.start_run("s", tokens(3), event="token")
        second = await finished(broadcaster, "s")
        for old in (first[1].id, "not-an-id"):
            answer = await get(client, "/runs/s/events", old)
            assert answer.status_code == 200
            events = parse(answer.content)
            assert events[0].type == "gap"
            assert json.loads(events[0].data)["lastEventId"] == old
            assert ids(events) == wire_ids(second)
        # The earlier run's end marker is where the current run starts: no gap, all of it.
        answer = await get(client, "/runs/s/events", first[-1].id)
        assert ids(parse(answer.content)) == wire_ids(second)
        assert parse(answer.content)[0].type == "token"


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_our_event_source_reads_the_run_once_and_stops_on_204(adapter: str) -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=50))
    gate = anyio.Event()
    async with serve(adapter, broadcaster) as client:
        await broadcaster.start_run("c", tokens(40, gate, at=15), event="token")
        url = str(client.base_url) + "/runs/c/events"
        received = []
        with anyio.fail_after(20):
            async with EventSource(url, client=client, reconnect_delay=0.05) as source:
                async for event in source:
                    received.append(event)
                    if len(received) == 5:
                        gate.set()
            assert source.connections == 2  # the run, then the 204
        transcript = await finished(broadcaster, "c")
        assert [e.id for e in received] == wire_ids(transcript)
        assert [e.data for e in received[:40]] == [f'{{"text":"t{i}"}}' for i in range(40)]


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_head_and_unknown_ids_never_start_anything(adapter: str) -> None:
    broadcaster = EventBroadcaster()
    async with serve(adapter, broadcaster) as client:
        for _ in range(3):
            assert (await get(client, "/runs/x/events", "1-2")).status_code == 404
        await broadcaster.start_run("h", tokens(3), event="token")
        transcript = await finished(broadcaster, "h")
        head = await client.head("/runs/h/events")
        assert head.status_code == 200
        assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert head.content == b""
        ended = await client.head("/runs/h/events", headers={"Last-Event-ID": transcript[-1].id})
        assert ended.status_code == 204
        assert broadcaster.stats()["runs"]["started"] == 1
        assert broadcaster.stats()["totalSubscribers"] == 0  # HEAD subscribed to nothing


# -- the FastAPI example of docs/runs.md --------------------------------------------------


def test_the_docs_example_is_the_tested_app() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert APP.read_text() in blocks, "docs/runs.md must show tests/apps/runs_fastapi.py as is"


async def test_the_fastapi_example_starts_follows_and_cancels() -> None:
    from .apps import runs_fastapi

    async with run_uvicorn(runs_fastapi.app) as running:
        alice = httpx.AsyncClient(
            base_url=running.base_url, cookies={"session": "token-alice"}, timeout=10
        )
        bob = httpx.AsyncClient(
            base_url=running.base_url, cookies={"session": "token-bob"}, timeout=10
        )
        async with alice, bob, httpx.AsyncClient(base_url=running.base_url) as anonymous:
            assert (await anonymous.get("/runs/r1/events")).status_code == 401
            assert (await anonymous.post("/runs/r1", json={"prompt": "hi"})).status_code == 401

            started = await alice.post("/runs/r1", json={"prompt": "why is the sky blue"})
            assert started.status_code == 202
            assert started.json()["state"] == "running"
            again = await alice.post("/runs/r1", json={"prompt": "again"})
            assert again.status_code == 409
            assert again.json() == {"detail": "this run is still running"}
            # Bob's r1 is another session: he cannot read Alice's run.
            assert (await bob.get("/runs/r1/events")).status_code == 404

            answer = await get(alice, "/runs/r1/events")
            assert answer.status_code == 200
            events = parse(answer.content)
            text = "".join(json.loads(e.data)["text"] for e in events if e.type == "token")
            assert text == "You asked: why is the sky blue. Here is a long answer. "
            assert json.loads(events[-1].data)["state"] == "finished"
            after_end = await get(alice, "/runs/r1/events", events[-1].last_event_id)
            assert after_end.status_code == 204
            assert (await alice.post("/runs/r1/cancel")).json() == {"cancelled": False}

            # Stop: the follower's stream ends with the cancelled end marker.
            assert (await alice.post("/runs/r2", json={"prompt": "x " * 200})).status_code == 202
            async with alice.stream("GET", "/runs/r2/events") as stream:
                parser = SSEParser()
                seen: list[ParsedEvent] = []
                with anyio.fail_after(15):
                    async for chunk in stream.aiter_bytes():
                        seen += parser.feed(chunk)
                        if len(seen) == 3:
                            cancelled = await alice.post("/runs/r2/cancel")
                            assert cancelled.json() == {"cancelled": True}
            assert seen[-1].type == "end"
            assert json.loads(seen[-1].data)["state"] == "cancelled"
            bad = await alice.post("/runs/r%01/cancel")
            assert bad.status_code == 400


# -- the demo's agent run routes (the page itself: tests/test_browser_runs.py) ----------


@asynccontextmanager
async def demo(**options: Any) -> AsyncIterator[tuple[httpx.AsyncClient, EventBroadcaster]]:
    from sse_broadcaster.demo import create_app

    broadcaster = EventBroadcaster()
    options = {"ticker_interval": None, "run_tokens": 40, "run_pacing": (0.001, 0.003)} | options
    app = create_app(broadcaster, **options)
    async with (
        run_uvicorn(app) as running,
        httpx.AsyncClient(base_url=running.base_url, timeout=10) as client,
    ):
        yield client, broadcaster


def test_simulated_tokens_are_deterministic_per_seed() -> None:
    from sse_broadcaster.demo.agent import simulated_tokens

    first = simulated_tokens(7, 300)
    assert first == simulated_tokens(7, 300)
    assert first != simulated_tokens(8, 300)
    assert len(first) == 300
    assert first[-1].endswith(". ")
    assert all(token.endswith(" ") and token.strip() for token in first)
    assert simulated_tokens(7, 10)[:9] == first[:9]  # a shorter answer starts the same


async def test_simulated_answer_is_paced_and_numbered() -> None:
    from sse_broadcaster.demo.agent import simulated_answer, simulated_tokens

    start = anyio.current_time()
    items = [item async for item in simulated_answer(3, 20, (0.01, 0.02))]
    elapsed = anyio.current_time() - start
    assert items == [{"i": i, "text": t} for i, t in enumerate(simulated_tokens(3, 20))]
    assert elapsed >= 20 * 0.01  # never faster than the pacing asks


async def test_demo_run_routes_start_follow_and_stop() -> None:
    from sse_broadcaster.demo.agent import simulated_tokens

    async with demo() as (client, broadcaster):
        assert (await client.get("/runs/a")).status_code == 404
        assert (await client.get("/runs/a/events")).status_code == 404
        assert (await client.post("/runs/a/cancel")).json() == {"cancelled": False}

        started = await client.post("/runs/a", json={"seed": 11})
        assert started.status_code == 202
        body = started.json()
        assert body["seed"] == 11
        assert body["tokens"] == 40
        assert body["state"] == "running"
        again = await client.post("/runs/a", json={"seed": 11})
        assert again.status_code == 409
        assert "already has a running run" in again.json()["error"]

        events = parse((await get(client, "/runs/a/events")).content)
        tokens = [json.loads(e.data) for e in events if e.type == "token"]
        assert tokens == [{"i": i, "text": t} for i, t in enumerate(simulated_tokens(11, 40))]
        state = (await client.get("/runs/a")).json()
        assert state["state"] == "finished"
        assert state["events"] == 40
        assert state["endEventId"] == events[-1].last_event_id
        assert (await get(client, "/runs/a/events", state["endEventId"])).status_code == 204

        # A random seed when none is asked for; the session is apart from the rooms.
        other = await client.post("/runs/b")
        assert other.status_code == 202
        assert 0 <= other.json()["seed"] <= 2**32 - 1
        assert (await client.post("/runs/b/cancel")).json() == {"cancelled": True}
        info = await broadcaster.run_info("run:b")
        assert info is not None
        assert info.state is RunState.CANCELLED
        page = await client.get("/run")
        assert page.status_code == 200
        assert 'content="agent"' in page.text
        assert not re.search(r'(src|href)="(https?:)?//', page.text)
        assert "new EventSource(" in (await client.get("/static/run.js")).text


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        pytest.param(b'{"seed": -1}', 400, "seed must be an integer in 0..4294967295, got -1"),
        pytest.param(b'{"seed": 1.5}', 400, "seed must be an integer", id="float"),
        pytest.param(b'{"seed": true}', 400, "seed must be an integer", id="bool"),
        pytest.param(b'{"seed": 1, "x": 2}', 400, 'the body takes only {"seed": n}', id="key"),
        pytest.param(b"[1]", 400, 'the body takes only {"seed": n}', id="array"),
        pytest.param(b"{", 400, "malformed JSON body", id="malformed"),
        pytest.param(b"\xff", 400, "malformed JSON body", id="not-utf8"),
        pytest.param(b" " * 1025, 413, "request body is larger than 1024 bytes", id="large"),
    ],
)
async def test_demo_run_start_refuses_bad_bodies(body: bytes, status: int, message: str) -> None:
    async with demo() as (client, broadcaster):
        answer = await client.post("/runs/a", content=body)
        assert answer.status_code == status
        assert answer.json()["error"].startswith(message)
        assert await broadcaster.run_info("run:a") is None  # nothing started


async def test_demo_run_routes_refuse_bad_names_and_other_origins() -> None:
    async with demo() as (client, broadcaster):
        for method, path in (
            ("POST", "/runs/a%01"),
            ("GET", "/runs/a%01"),
            ("GET", "/runs/a%01/events"),
            ("POST", "/runs/a%01/cancel"),
        ):
            answer = await client.request(method, path)
            assert answer.status_code == 400, path
            assert answer.json()["error"].startswith("invalid run name: session_id must not")
        evil = {"Origin": "http://evil.example"}
        for path in ("/runs/a", "/runs/a/cancel"):
            answer = await client.post(path, headers=evil)
            assert answer.status_code == 403
            assert answer.json()["error"].startswith("cross-origin POST refused")
        assert await broadcaster.run_info("run:a") is None


def test_demo_checks_the_run_options() -> None:
    from sse_broadcaster.demo import create_app

    with pytest.raises(ValueError, match=r"run_tokens must be an int in 1\.\.10000, got 0"):
        create_app(run_tokens=0)
    with pytest.raises(ValueError, match=r"run_pacing must be \(low, high\)"):
        create_app(run_pacing=(0.5, 0.1))


class _NoRunsBackend(MemoryBackend):
    """A backend with no run store: any third-party backend that predates runs."""

    run_store = None


async def test_demo_runs_on_a_backend_without_runs_answer_503() -> None:
    from sse_broadcaster.demo import create_app

    broadcaster = EventBroadcaster(backend=_NoRunsBackend())
    app = create_app(broadcaster, ticker_interval=None)
    async with (
        run_uvicorn(app) as running,
        httpx.AsyncClient(base_url=running.base_url, timeout=10) as client,
    ):
        for method, path in (
            ("POST", "/runs/a"),
            ("GET", "/runs/a"),
            ("GET", "/runs/a/events"),
            ("POST", "/runs/a/cancel"),
        ):
            answer = await client.request(method, path)
            assert answer.status_code == 503, path
            assert "does not support runs" in answer.json()["error"]


async def test_a_cancelled_run_counts_every_item_it_published() -> None:
    # A cancel lands at the checkpoint right after a publish (the generator never
    # awaits): the end marker's count must include that item (it used to miss it,
    # and the Chromium test saw one token more than the run's count).
    async def forever() -> AsyncIterator[str]:
        n = 0
        while True:
            n += 1
            yield str(n)

    async with EventBroadcaster() as broadcaster:
        await broadcaster.start_run("s", forever())
        await anyio.sleep(0.01)
        assert await broadcaster.cancel_run("s")
        history = await broadcaster.history("s")
        info = await broadcaster.run_info("s")
        assert info is not None
        assert info.events == len(history) - 1 == json.loads(history[-1].data)["events"]
        assert history[-2].data == str(info.events)


async def test_a_broadcaster_not_running_is_answered_come_back_later() -> None:
    # run_info raises BroadcasterClosedError: the answer is the usual 200 with a
    # jittered retry: and Retry-After (a browser comes back), never a 500.
    from sse_broadcaster.asgi import follow_run

    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=1000))  # never entered

    async def app(
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        assert scope["type"] == "http"
        await (await follow_run(broadcaster, "s", scope))(scope, receive, send)

    async with (
        run_uvicorn(app, lifespan="off") as running,
        httpx.AsyncClient(base_url=running.base_url, timeout=10) as client,
    ):
        answer = await get(client, "/runs/s/events")
        assert answer.status_code == 200
        assert 1 <= int(answer.headers["retry-after"]) <= 2
        assert re.fullmatch(rb"retry: \d+\n\n: .+\n\n", answer.content), answer.content
