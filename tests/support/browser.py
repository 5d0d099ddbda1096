"""Debian's Chromium driven by Playwright: the ``chromium`` and ``browser`` fixtures.

Registered for every test module by tests/conftest.py. Playwright's async API
runs on asyncio only, so the browser test modules set ``anyio_backend`` to
asyncio. The browser tests never skip: a missing Chromium fails them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

CHROMIUM = Path(os.environ.get("SSE_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def chromium() -> str:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: install Debian's package "
            "(apt-get install -y chromium; .ci/run does it). The browser tests never skip."
        )
    return str(CHROMIUM)


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


async def wait_for_js(page: Any, expression: str, within: float = 15.0) -> Any:
    """Poll a JS expression in the page until it is truthy; return its value."""
    with anyio.fail_after(within):
        while True:
            value = await page.evaluate(expression)
            if value:
                return value
            await anyio.sleep(0.05)
