"""The demo page in a real headless Chromium (Debian's package), driven by Playwright.

The browser's own EventSource does the reconnecting: these tests check what a
browser sees when the server ends its stream (no hole, no duplicate), when a
subscriber limit is reached (it keeps retrying), and when history is gone (the
page shows the gap). The first test also takes the screenshot the docs use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from sse_broadcaster import BroadcasterConfig

from .support.browser import wait_for_js
from .support.demo_server import serve_demo

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

# The docs' screenshot is rewritten only on request, so a test run leaves the tree clean:
#   SSE_BROADCASTER_UPDATE_SCREENSHOT=1 pytest tests/test_browser.py
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "demo.png"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Playwright's async API runs on asyncio only


def _check_contiguous(ids: list[str]) -> tuple[int, int]:
    """Assert one epoch and consecutive numbers; return (first, last)."""
    assert ids, "the page received no event"
    epochs = {i.rpartition("-")[0] for i in ids}
    assert len(epochs) == 1, f"ids from several epochs: {sorted(epochs)}"
    numbers = [int(i.rpartition("-")[2]) for i in ids]
    duplicates = len(numbers) - len(set(numbers))
    holes = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    assert duplicates == 0, f"{duplicates} duplicate ids in {ids}"
    assert holes == [], f"holes at {holes} in {ids}"
    assert numbers == sorted(numbers), f"ids out of order: {ids}"
    return numbers[0], numbers[-1]


async def test_reconnects_with_last_event_id_without_hole_or_duplicate(
    browser: Any, tmp_path: Path
) -> None:
    config = BroadcasterConfig(retry_ms=250, keepalive_interval=5.0)
    async with serve_demo(config, ticker_interval=0.2) as url:
        page = await browser.new_page(viewport={"width": 1280, "height": 860})
        stream_requests: list[dict[str, str]] = []

        async def on_request(request: Any) -> None:
            if "/events/" in request.url:
                stream_requests.append(await request.all_headers())

        page.on("request", on_request)
        console_errors: list[str] = []
        page.on("pageerror", lambda exc: console_errors.append(str(exc)))
        await page.goto(url + "/")
        await wait_for_js(page, "window.demo.receivedIds.length >= 4")
        assert await page.text_content("#status") == "open"

        # The publish form, as a person would use it.
        await page.fill("#publish-data", "Hello from Chromium")
        await page.click("#publish-button")
        await page.wait_for_selector("#feed li:has-text('Hello from Chromium')", timeout=10_000)

        async with httpx.AsyncClient(base_url=url) as client:
            for round_ in (1, 2):
                before = await page.evaluate("window.demo.receivedIds.length")
                answer = await client.post("/admin/drop-streams/lobby")
                assert answer.json() == {"room": "lobby", "streamsEnded": True}
                await wait_for_js(page, f"window.demo.reconnects >= {round_}")
                # Ticks published while the browser was away come back by replay.
                await wait_for_js(page, f"window.demo.receivedIds.length >= {before + 5}")
            stats = (await client.get("/stats")).json()

        # Wait for a few points on the memory chart, then keep the picture.
        await wait_for_js(page, "window.demo.memory.length >= 5", within=20)
        demo = await page.evaluate(
            "({ids: window.demo.receivedIds.slice(), reconnects: window.demo.reconnects,"
            " errors: window.demo.errors, gaps: window.demo.gaps.length,"
            " recreated: window.demo.recreated})"
        )
        screenshot = tmp_path / "demo.png"
        if os.environ.get("SSE_BROADCASTER_UPDATE_SCREENSHOT") == "1":
            screenshot = DOCS_SCREENSHOT
        await page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 10_000  # a real picture, not a blank page
        await page.close()

    first, last = _check_contiguous(demo["ids"])
    assert demo["reconnects"] == 2
    assert demo["gaps"] == 0
    assert demo["recreated"] == 0, "EventSource gave up; the page had to make a new one"
    # The browser itself sent Last-Event-ID on both reconnects, and the server replayed.
    resumed = [h["last-event-id"] for h in stream_requests if "last-event-id" in h]
    assert len(resumed) == 2, stream_requests
    assert all(r in demo["ids"] for r in resumed)
    assert stats["replays"] == 2
    # retry_ms (250) exceeds the tick (200 ms): each time away, at least one tick
    # was published, and the browser got it by replay.
    assert stats["replayedEvents"] >= 2
    assert stats["gaps"] == 0
    assert console_errors == []
    print(
        f"\nChromium: {len(demo['ids'])} ids received ({first}..{last}), "
        f"{demo['reconnects']} reconnects, {stats['replayedEvents']} replayed, "
        "0 holes, 0 duplicates"
    )


async def test_subscriber_limit_keeps_the_browser_retrying(browser: Any) -> None:
    config = BroadcasterConfig(retry_ms=200, keepalive_interval=5.0, max_subscribers_per_session=1)
    async with serve_demo(config, ticker_interval=0.2) as url:
        page = await browser.new_page()
        responses: list[tuple[int, dict[str, str]]] = []

        async def on_response(response: Any) -> None:
            if "/events/" in response.url:
                responses.append((response.status, await response.all_headers()))

        page.on("response", on_response)
        await page.goto(url + "/")
        await wait_for_js(page, "window.demo.receivedIds.length >= 1")

        # The page holds the only subscriber slot; a second EventSource is turned away.
        await page.evaluate(
            """() => {
                const second = new EventSource('/events/lobby');
                window.second = {source: second, errors: 0, messages: 0, opened: 0};
                second.addEventListener('error', () => { window.second.errors += 1; });
                second.addEventListener('open', () => { window.second.opened += 1; });
                second.addEventListener('tick', () => { window.second.messages += 1; });
            }"""
        )
        await wait_for_js(page, "window.second.errors >= 3")
        state = await page.evaluate("window.second.source.readyState")
        assert state != 2, (
            "EventSource gave up (CLOSED): the server answered something else than 200"
        )
        assert await page.evaluate("window.second.messages") == 0

        # Once the slot is free, the same EventSource gets in by itself.
        await page.evaluate("window.demo.source.close()")
        await wait_for_js(page, "window.second.messages >= 2")
        assert await page.evaluate("window.second.source.readyState") == 1
        await page.close()

    turned_away = [headers for status, headers in responses if "retry-after" in headers]
    assert turned_away, responses
    assert all(status == 200 for status, _ in responses), responses


async def test_lost_history_shows_the_gap_notice(browser: Any) -> None:
    config = BroadcasterConfig(retry_ms=200, keepalive_interval=5.0)
    async with (
        serve_demo(config, ticker_interval=None) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        page = await browser.new_page()
        await page.goto(url + "/")
        await wait_for_js(page, "window.demo.opens >= 1")
        for n in range(2):
            await client.post("/publish/lobby", json={"data": f"before {n}"})
        await wait_for_js(page, "window.demo.receivedIds.length >= 2")
        assert await page.is_hidden("#gap-notice")
        last = await page.evaluate("window.demo.receivedIds.at(-1)")

        answer = await client.post("/admin/close/lobby")
        assert answer.json() == {"room": "lobby", "existed": True}
        await page.wait_for_selector("#gap-notice", state="visible", timeout=10_000)
        assert last in (await page.text_content("#gap-text") or "")
        assert await page.evaluate("window.demo.gaps") == [{"lastEventId": last, "replayed": 0}]
        # The feed goes on in the room's new history.
        await client.post("/publish/lobby", json={"data": "after"})
        await wait_for_js(page, "window.demo.receivedIds.length >= 3")
        await page.close()


async def test_a_page_on_another_site_cannot_publish_or_end_streams(browser: Any) -> None:
    # A page elsewhere that posts forms to the demo, as a hostile site would:
    # a form post is a "simple" request, sent cross-origin with no CORS preflight.
    config = BroadcasterConfig(retry_ms=200, keepalive_interval=5.0)
    async with (
        serve_demo(config, ticker_interval=None) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        evil = (
            "<!doctype html><title>evil</title>"
            f'<form id="publish" method="post" action="{url}/publish/victim">'
            '<input name="data" value="pwned"></form>'
            f'<form id="drop" method="post" action="{url}/admin/drop-streams/lobby"></form>'
        )
        page = await browser.new_page()
        await page.route(
            "http://evil.example/",
            lambda route: route.fulfill(body=evil, content_type="text/html"),
        )
        sent: list[dict[str, str]] = []

        async def on_request(request: Any) -> None:
            if request.method == "POST":
                sent.append(await request.all_headers())

        page.on("request", on_request)
        # A stream on the demo, which the second form tries to end.
        async with client.stream("GET", "/events/lobby") as stream:
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("retry:")
            answers: list[tuple[int, str]] = []
            for form in ("publish", "drop"):
                await page.goto("http://evil.example/")
                async with page.expect_navigation() as navigation:
                    await page.evaluate(f"document.getElementById('{form}').submit()")
                response = await navigation.value
                answers.append((response.status, await page.text_content("body") or ""))
            # The stream is still open: an event published now arrives on it.
            marker = await client.post("/publish/lobby", json={"data": "still open"})
            assert marker.status_code == 200
            received = None
            with anyio.fail_after(10):
                async for line in lines:
                    if line.startswith("data:"):
                        received = line
                        break
            assert received == "data: still open", "the stream was ended"
        # Chromium's own headers reached the server, which refused both posts.
        assert [h.get("origin") for h in sent] == ["http://evil.example"] * 2, sent
        for status, text in answers:
            assert status == 403, text
            assert "cross-origin POST refused" in text, text
        closed = await client.post("/admin/close/victim")
        assert closed.json() == {"room": "victim", "existed": False}
        await page.close()
