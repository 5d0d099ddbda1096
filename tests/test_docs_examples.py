"""The code on docs/sse-starlette.md and the httpx-sse note of docs/sse-client.md, run.

Each runnable block is marked ``<!-- test: NAME -->`` on the line before its
fence. Every code block of the migration page must be marked (checked here), and
every marked block is executed as a module and served on a real uvicorn: the
sse-starlette version and ours of each app, streamed with httpx, and checked
against what the page says. The peers (sse-starlette, encode/broadcaster) are
asyncio libraries, so these tests run on asyncio.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.support.servers import run_uvicorn, wait_for

ROOT = Path(__file__).resolve().parent.parent
MIGRATION = ROOT / "docs" / "sse-starlette.md"
CLIENT = ROOT / "docs" / "sse-client.md"
_MARKED = re.compile(r"<!-- test: ([\w-]+) -->\n```python\n(.*?)\n```", re.S)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def blocks(page: Path) -> dict[str, str]:
    """The marked Python blocks of a page, by name."""
    found: dict[str, str] = {}
    for name, code in _MARKED.findall(page.read_text()):
        assert name not in found, f"{page.name}: two blocks named {name!r}"
        found[name] = code
    return found


def load(page: Path, name: str) -> types.ModuleType:
    """Execute a marked block as a fresh module (pydantic resolves names through it)."""
    module = types.ModuleType(f"docs_example_{name.replace('-', '_')}")
    sys.modules[module.__name__] = module
    try:
        exec(compile(blocks(page)[name], f"{page.name}:{name}", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module


@asynccontextmanager
async def serve(name: str) -> AsyncIterator[tuple[types.ModuleType, httpx.AsyncClient]]:
    module = load(MIGRATION, name)
    async with (
        run_uvicorn(module.app) as running,
        httpx.AsyncClient(base_url=running.base_url, timeout=10) as client,
    ):
        yield module, client


def messages(events: list[ServerSentEvent]) -> list[tuple[str, str]]:
    """(event, data) of the events that carry something (see docs/sse-client.md)."""
    return [(e.event, e.data) for e in events if e.data or e.event != "message"]


def test_every_python_block_of_the_migration_page_is_marked() -> None:
    text = MIGRATION.read_text()
    assert len(re.findall(r"^```$", text, re.M)) == len(re.findall(r"^```python$", text, re.M))
    fences = re.findall(r"^```python$", text, re.M)
    assert len(fences) == len(re.findall(r"^```\w", text, re.M)), "only Python blocks"
    assert len(fences) == len(blocks(MIGRATION)), "a Python block has no test marker"


def test_the_migration_page_marks_both_versions_of_each_app() -> None:
    names = set(blocks(MIGRATION))
    apps = {"tokens", "chat", "notify"}
    assert names == {f"{app}-{lib}" for app in apps for lib in ("sse-starlette", "ours")}


@pytest.mark.parametrize("lib", ["sse-starlette", "ours"])
async def test_tokens(lib: str) -> None:
    async with serve(f"tokens-{lib}") as (_, client):
        events: list[ServerSentEvent] = []
        async with aconnect_sse(client, "GET", "/generate", params={"prompt": "a poem"}) as source:
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            async for sse in source.aiter_sse():
                events.append(sse)
    words = ["you", "asked", "for", "a", "poem"]
    assert messages(events) == [("token", w) for w in words] + [("done", "[DONE]")]


async def _wait_subscribed(lib: str, module: types.ModuleType, channel: str) -> None:
    if lib == "ours":
        await wait_for(lambda: module.broadcaster.subscriber_count(channel) == 1, 10, channel)
    elif hasattr(module, "broadcast"):  # encode/broadcaster's memory backend
        await wait_for(lambda: bool(module.broadcast._subscribers.get(channel)), 10, channel)
    else:  # the page's dict of queues
        await wait_for(lambda: bool(module.queues.get(channel)), 10, channel)


async def _read(
    client: httpx.AsyncClient,
    path: str,
    count: int,
    *,
    lib: str,
    module: types.ModuleType,
    channel: str,
    headers: dict[str, str] | None = None,
    publish: Sequence[tuple[str, dict[str, str]]] = (),
) -> list[ServerSentEvent]:
    """Open `path`, post `publish` once subscribed, return the first `count` messages."""
    got: list[ServerSentEvent] = []
    with anyio.fail_after(10):
        async with aconnect_sse(client, "GET", path, headers=dict(headers or {})) as source:
            assert source.response.status_code == 200
            await _wait_subscribed(lib, module, channel)
            for url, body in publish:
                assert (await client.post(url, json=body)).status_code == 200
            async for sse in source.aiter_sse():
                got.append(sse)
                if len([e for e in got if e.data or e.event != "message"]) == count:
                    break
    return got


@pytest.mark.parametrize("lib", ["sse-starlette", "ours"])
async def test_chat_room_reconnect(lib: str) -> None:
    async with serve(f"chat-{lib}") as (module, client):
        post = "/rooms/lobby/messages"
        first = await _read(
            client,
            "/rooms/lobby/events",
            2,
            lib=lib,
            module=module,
            channel="lobby",
            publish=[(post, {"text": "m1"}), (post, {"text": "m2"})],
        )
        assert messages(first) == [("chat", "m1"), ("chat", "m2")]
        if lib == "ours":
            await wait_for(lambda: module.broadcaster.subscriber_count("lobby") == 0, 10)
        # Posted while the client is away.
        for text in ("m3", "m4"):
            assert (await client.post(post, json={"text": text})).status_code == 200
        last_id = first[-1].id
        again = await _read(
            client,
            "/rooms/lobby/events",
            1 if lib == "sse-starlette" else 3,
            lib=lib,
            module=module,
            channel="lobby",
            headers={"Last-Event-ID": last_id} if last_id else None,
            publish=[(post, {"text": "m5"})],
        )
        if lib == "sse-starlette":
            # No ids: nothing to resume from; m3 and m4 are lost, silently.
            assert last_id == ""
            assert messages(again) == [("chat", "m5")]
            return
        assert first[0].retry == 2000  # the opening `retry:` block (see docs/sse-client.md)
        assert last_id
        assert messages(again) == [("chat", "m3"), ("chat", "m4"), ("chat", "m5")]
        # An id the history does not know: a gap event, then everything retained.
        gap = await _read(
            client,
            "/rooms/lobby/events",
            6,
            lib=lib,
            module=module,
            channel="lobby",
            headers={"Last-Event-ID": "from-before-a-restart"},
        )
        got = messages(gap)
        assert got[0][0] == "gap"
        assert '"lastEventId":"from-before-a-restart"' in got[0][1]
        assert got[1:] == [("chat", f"m{i}") for i in range(1, 6)]


@pytest.mark.parametrize("lib", ["sse-starlette", "ours"])
async def test_notifications_behind_depends(lib: str) -> None:
    async with serve(f"notify-{lib}") as (module, client):
        refused = await client.get("/notifications")
        assert refused.status_code == 401
        assert refused.json() == {"detail": "log in first"}
        client.cookies.set("session", "token-mallory")
        refused = await client.get("/notifications")
        assert refused.status_code == 401
        channel = "user-alice" if lib == "ours" else "alice"
        client.cookies.set("session", "token-alice")
        got = await _read(
            client,
            "/notifications",
            2,
            lib=lib,
            module=module,
            channel=channel,
            publish=[
                ("/users/bob/notify", {"text": "for bob"}),
                ("/users/alice/notify", {"text": "hello alice"}),
                ("/users/alice/notify", {"text": "bye alice"}),
            ],
        )
        assert messages(got) == [("notification", "hello alice"), ("notification", "bye alice")]
        if lib == "ours":
            # Sent while alice is offline: replayed when she comes back with her id.
            await wait_for(lambda: module.broadcaster.subscriber_count(channel) == 0, 10)
            await client.post("/users/alice/notify", json={"text": "while away"})
            back = await _read(
                client,
                "/notifications",
                1,
                lib=lib,
                module=module,
                channel=channel,
                headers={"Last-Event-ID": got[-1].id},
            )
            assert messages(back) == [("notification", "while away")]


async def test_httpx_sse_yields_an_empty_event_for_the_retry_block() -> None:
    """The claim of the note in docs/sse-client.md, and the note's own filter."""
    from sse_broadcaster.starlette import EventSourceResponse

    async def countdown(scope: Any, receive: Any, send: Any) -> None:
        async def ticks() -> AsyncIterator[dict[str, str]]:
            for i in (3, 2, 1):
                yield {"event": "tick", "data": str(i)}

        await EventSourceResponse(ticks(), retry=3000)(scope, receive, send)

    note = load(CLIENT, "httpx-sse-filter")
    async with run_uvicorn(countdown, lifespan="off") as running:
        async with httpx.AsyncClient() as client:
            raw: list[ServerSentEvent] = []
            async with aconnect_sse(client, "GET", running.base_url) as source:
                async for sse in source.aiter_sse():
                    raw.append(sse)
        # httpx-sse turns the opening `retry: 3000` block into a data-less "message".
        assert (raw[0].event, raw[0].data, raw[0].retry) == ("message", "", 3000)
        assert [(e.event, e.data) for e in raw[1:]] == [("tick", "3"), ("tick", "2"), ("tick", "1")]
        filtered = await note.read_events(running.base_url)
    assert [(e.event, e.data) for e in filtered] == [("tick", "3"), ("tick", "2"), ("tick", "1")]
