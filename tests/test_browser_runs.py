"""The demo's agent run page in a real headless Chromium (#13 item 7).

The browser's own EventSource follows a run the server runs (a simulated token
stream with a known seed): a reload mid-run, a stream the server drops, a
second tab and Stop all leave each page with the run's tokens in order, none
twice, none missing; after the end the browser is answered 204 once and stops.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from sse_broadcaster import BroadcasterConfig, EventBroadcaster, RunState
from sse_broadcaster.demo import create_app
from sse_broadcaster.demo.agent import run_session, simulated_tokens

from .support.browser import wait_for_js
from .support.servers import run_uvicorn

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

TOKENS = 200  # a finished run: about 5 s at PACING
LONG_RUN = 1000  # the run that is stopped: time to reload, open a tab and stop on a busy machine
PACING = (0.01, 0.03)
# How long the test watches for reconnects after a run's end (retry: is 300 ms).
QUIET = 3.0
# The docs' screenshot is rewritten only on request, so a test run leaves the tree clean:
#   SSE_BROADCASTER_UPDATE_SCREENSHOT=1 pytest tests/test_browser_runs.py
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "agent-run.png"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Playwright's async API runs on asyncio only


@asynccontextmanager
async def serve(broadcaster: EventBroadcaster, tokens: int = TOKENS) -> AsyncIterator[str]:
    app = create_app(broadcaster, ticker_interval=None, run_tokens=tokens, run_pacing=PACING)
    async with run_uvicorn(app, timeout_graceful_shutdown=5) as server:
        yield server.base_url


class StreamLog:
    """The statuses of a page's requests to the run's stream, in order."""

    def __init__(self, page: Any, name: str) -> None:
        self.statuses: list[int] = []
        self.requests = 0

        def on_request(request: Any) -> None:
            if f"/runs/{name}/events" in request.url:
                self.requests += 1

        def on_response(response: Any) -> None:
            if f"/runs/{name}/events" in response.url:
                self.statuses.append(response.status)

        page.on("request", on_request)
        page.on("response", on_response)

    async def check_stops(self, page: Any) -> None:
        """After the run's end: one 204, then no request at all for `QUIET` seconds."""
        await wait_for_js(page, "window.runDemo.status === 'closed'", within=20.0)
        settled = self.requests
        await anyio.sleep(QUIET)
        assert self.requests == settled, "the page kept reconnecting after the run's end"
        assert self.statuses[-1] == 204, self.statuses
        assert self.statuses[-2] != 204, self.statuses  # one 204 was enough


async def _received(page: Any) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(
        "({tokens: window.runDemo.tokens.slice(), indices: window.runDemo.indices.slice(),"
        " ids: window.runDemo.ids.slice(), state: window.runDemo.state,"
        " ends: window.runDemo.ends.slice(), gaps: window.runDemo.gaps.slice(),"
        " opens: window.runDemo.opens, sources: window.runDemo.sources,"
        " text: document.getElementById('transcript').textContent})"
    )
    return result


def _check_whole(received: dict[str, Any], expected: list[str]) -> None:
    """The page holds the first tokens of the answer: in order, none twice, none missing."""
    count = len(received["tokens"])
    assert received["indices"] == list(range(count))
    assert received["tokens"] == expected[:count]
    assert received["text"] == "".join(expected[:count])
    assert len(set(received["ids"])) == count


async def test_reload_tab_drop_and_stop(browser: Any) -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=300))
    async with serve(broadcaster, LONG_RUN) as url:
        context = await browser.new_context()
        first = await context.new_page()
        errors: list[str] = []
        first.on("pageerror", lambda exc: errors.append(str(exc)))
        first_log = StreamLog(first, "t1")
        await first.goto(url + "/run?run=t1")
        # No run yet: the stream is answered 404 and the page stops following.
        await wait_for_js(first, "window.runDemo.status === 'closed'", within=20.0)
        assert await first.text_content("#run-state") == "no run"
        assert first_log.statuses == [404]

        # Start, as a person would: the page shows the run as it streams.
        async with first.expect_response(lambda r: r.url.endswith("/runs/t1")) as answer_info:
            await first.click("#start-button")
        answer = await (await answer_info.value).json()
        expected = simulated_tokens(answer["seed"], LONG_RUN)
        await wait_for_js(first, "window.runDemo.tokens.length >= 30", within=20.0)
        assert await first.text_content("#run-state") == "running"

        # A reload mid-run: the new page gets the whole run from its first token.
        await first.reload()
        await wait_for_js(first, "window.runDemo.tokens.length >= 50", within=20.0)
        _check_whole(await _received(first), expected)

        # The server drops the stream: the browser reconnects with Last-Event-ID
        # by itself and gets exactly the rest.
        before = await first.evaluate("window.runDemo.tokens.length")
        assert broadcaster.disconnect_subscribers(run_session("t1")) == 1
        await wait_for_js(first, "window.runDemo.opens >= 2", within=20.0)
        await wait_for_js(first, f"window.runDemo.tokens.length >= {before + 20}", within=20.0)
        received = await _received(first)
        assert received["sources"] == 1  # the same EventSource, reconnected
        _check_whole(received, expected)

        # A second tab follows the same run from its start.
        second = await context.new_page()
        second.on("pageerror", lambda exc: errors.append(str(exc)))
        second_log = StreamLog(second, "t1")
        await second.goto(url + "/run?run=t1")
        await wait_for_js(second, "window.runDemo.tokens.length >= 10", within=20.0)
        assert await second.text_content("#run-state") == "running"

        # Stop in the first tab ends the run in both.
        await first.click("#stop-button")
        for page in (first, second):
            await wait_for_js(page, "window.runDemo.state === 'cancelled'", within=20.0)
            assert await page.text_content("#run-state") == "cancelled"
        info = await broadcaster.run_info(run_session("t1"))
        assert info is not None
        assert info.state is RunState.CANCELLED
        assert 50 <= info.events < LONG_RUN
        for page in (first, second):
            received = await _received(page)
            assert len(received["tokens"]) == info.events  # every token, up to the stop
            _check_whole(received, expected)
            assert received["ends"] == [
                {"state": "cancelled", "runId": info.run_id, "events": info.events}
            ]
            assert await page.is_disabled("#stop-button")
        # Both come back once after the end marker, are told 204, and stop.
        await first_log.check_stops(first)
        await second_log.check_stops(second)
        assert errors == []


async def test_a_finished_run_reloads_as_its_transcript_and_does_not_reconnect(
    browser: Any, tmp_path: Path
) -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=300))
    async with serve(broadcaster) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            started = await client.post("/runs/done", json={"seed": 42})
            assert started.status_code == 202
        with anyio.fail_after(30):
            while (info := await broadcaster.run_info(run_session("done"))) is None or (
                info.state is RunState.RUNNING
            ):
                await anyio.sleep(0.05)
        expected = simulated_tokens(42, TOKENS)

        page = await browser.new_page(viewport={"width": 1100, "height": 640})
        log = StreamLog(page, "done")
        await page.goto(url + "/run?run=done")
        for load in (1, 2):
            await wait_for_js(page, "window.runDemo.state === 'finished'", within=20.0)
            received = await _received(page)
            assert len(received["tokens"]) == TOKENS
            _check_whole(received, expected)
            assert received["gaps"] == []
            await log.check_stops(page)
            # Each load: the transcript (200), then the end's id answered 204.
            assert log.statuses == [200, 204] * load
            if load == 1:
                await page.reload()
        screenshot = tmp_path / "agent-run.png"
        if os.environ.get("SSE_BROADCASTER_UPDATE_SCREENSHOT") == "1":
            screenshot = DOCS_SCREENSHOT
        await page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 10_000  # a real picture, not a blank page
