"""Shutdown with many open streams, and what connections leave behind.

The way users run things: the plain ``uvicorn tests.apps.sse_app:app`` command
in a subprocess, stopped with SIGTERM; aiohttp's ``AppRunner.cleanup()``.
Measured times are printed (``pytest -s``) for the issue's report.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from sse_broadcaster import BroadcasterConfig, EventBroadcaster
from sse_broadcaster.starlette import open_streams

from .support.servers import (
    ADAPTERS,
    free_port,
    make_app,
    open_raw,
    run_aiohttp,
    run_uvicorn,
    wait_for,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

STREAMS = 1000
CYCLES = 1000
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and aiohttp run on asyncio only


@dataclass
class Clients:
    """Many open streams, each waiting for the server to end it."""

    count: int
    opened: int = 0
    ended_cleanly: int = 0
    failures: list[str] = field(default_factory=list)
    all_open: anyio.Event = field(default_factory=anyio.Event)
    all_ended: anyio.Event = field(default_factory=anyio.Event)

    async def hold(self, base_url: str, path: str, limiter: anyio.CapacityLimiter) -> None:
        async with AsyncExitStack() as stack:
            async with limiter:
                raw = await stack.enter_async_context(open_raw(base_url, path))
                assert raw.status == 200
                assert (await raw.read_chunk()).startswith(b"retry:")
            raw.timeout = 30
            self.opened += 1
            if self.opened == self.count:
                self.all_open.set()
            try:
                await raw.read_body()  # until the terminating chunk
            except Exception as exc:
                self.failures.append(repr(exc))
            else:
                self.ended_cleanly += 1
            if self.ended_cleanly + len(self.failures) == self.count:
                self.all_ended.set()

    def start(self, task_group: anyio.abc.TaskGroup, base_url: str) -> None:
        limiter = anyio.CapacityLimiter(50)
        for i in range(self.count):
            task_group.start_soon(self.hold, base_url, f"/events/room-{i % 10}", limiter)


HTTP_IMPLEMENTATIONS = [
    "h11",
    pytest.param(
        "httptools",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("httptools") is None, reason="httptools is not installed"
        ),
    ),
]


async def start_uvicorn(app: str, log: Path, *options: str) -> tuple[anyio.abc.Process, str]:
    """``uvicorn <app>`` as users run it, logging to `log`; returns it and its base URL."""
    port = free_port()
    uvicorn = Path(sys.executable).parent / "uvicorn"
    command = [str(uvicorn), app, "--host", "127.0.0.1", "--port", str(port), *options]
    with log.open("wb") as log_file:  # a file, not a pipe: 1,000 access-log lines fill a pipe
        process = await anyio.open_process(
            command,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return process, f"http://127.0.0.1:{port}"


async def stop_process(process: anyio.abc.Process) -> None:
    if process.returncode is None:
        process.kill()
    with anyio.CancelScope(shield=True), anyio.fail_after(10):
        await process.wait()
    await process.aclose()


async def wait_until_serving(base_url: str) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    with anyio.fail_after(20):
        while True:
            try:
                stream = await anyio.connect_tcp(host, int(port))
            except OSError:
                await anyio.sleep(0.05)
            else:
                await stream.aclose()
                return


@pytest.mark.parametrize("protocol", HTTP_IMPLEMENTATIONS)
async def test_uvicorn_itself_does_not_end_open_streams_on_sigterm(
    tmp_path: Path, protocol: str
) -> None:
    """Why the adapter chains uvicorn's signal handlers.

    uvicorn 0.54 answers SIGTERM by waiting for open responses to finish; it
    does not send them ``http.disconnect``. Should a later uvicorn do so,
    this test fails: the hook could then go.
    """
    process, base_url = await start_uvicorn(
        "tests.apps.bare_stream:app", tmp_path / "log", "--http", protocol
    )
    try:
        await wait_until_serving(base_url)
        async with open_raw(base_url, "/") as raw:
            assert await raw.read_chunk() == b"retry: 1000\n\n"
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(1.5):
                await process.wait()
            still_running = process.returncode is None
    finally:
        await stop_process(process)
    assert still_running, "uvicorn ended an open stream on SIGTERM by itself"
    assert "Waiting for connections to close" in (tmp_path / "log").read_text()


@pytest.mark.parametrize("protocol", HTTP_IMPLEMENTATIONS)
async def test_uvicorn_sigterm_with_open_streams_exits_promptly(
    tmp_path: Path, protocol: str
) -> None:
    log = tmp_path / "uvicorn.log"
    process, base_url = await start_uvicorn("tests.apps.sse_app:app", log, "--http", protocol)
    try:
        await wait_until_serving(base_url)
        async with httpx.AsyncClient(timeout=5) as http:
            clients = Clients(STREAMS)
            async with anyio.create_task_group() as tg:
                clients.start(tg, base_url)
                with anyio.fail_after(60):
                    await clients.all_open.wait()
                stats = (await http.get(base_url + "/stats")).json()
                assert stats["totalSubscribers"] == STREAMS
                await http.aclose()  # its keep-alive connection would count too
                start = time.monotonic()
                process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(10):
                    await process.wait()
                took = time.monotonic() - start
                with anyio.fail_after(5):
                    await clients.all_ended.wait()
    finally:
        await stop_process(process)
    stderr = log.read_text()
    waited = "Waiting for connections to close" in stderr
    print(
        f"\nuvicorn ({protocol}) SIGTERM with {STREAMS} open streams: exited in {took:.3f} s "
        f"(logged 'Waiting for connections to close': {waited})"
    )
    assert took < 2.0, stderr
    # uvicorn re-raises the signal it handled once it has shut down
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert clients.failures == []
    assert clients.ended_cleanly == STREAMS
    assert "timeout graceful shutdown exceeded" not in stderr
    assert "Application shutdown complete" in stderr


async def test_aiohttp_runner_cleanup_with_open_streams_is_prompt() -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig(max_subscribers_per_session=None))
    clients = Clients(STREAMS)
    async with run_aiohttp(make_app("aiohttp", broadcaster), shutdown_timeout=10) as running:
        runner = running.server
        async with anyio.create_task_group() as tg:
            clients.start(tg, running.base_url)
            with anyio.fail_after(60):
                await clients.all_open.wait()
            assert broadcaster.stats()["totalSubscribers"] == STREAMS
            start = time.monotonic()
            await runner.cleanup()
            took = time.monotonic() - start
            with anyio.fail_after(5):
                await clients.all_ended.wait()
    print(f"\naiohttp runner.cleanup() with {STREAMS} open streams: {took:.3f} s")
    assert took < 2.0
    assert clients.failures == []
    assert clients.ended_cleanly == STREAMS
    assert not broadcaster.running


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_no_task_left_after_connect_disconnect_cycles(adapter: str) -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig(max_subscribers_per_session=None))
    app = make_app(adapter, broadcaster)
    runner = run_uvicorn(app) if adapter == "starlette" else run_aiohttp(app)
    async with runner as running:
        limiter = anyio.CapacityLimiter(20)

        async def cycle(i: int) -> None:
            async with limiter, open_raw(running.base_url, f"/events/room-{i % 7}") as raw:
                assert (await raw.read_chunk()).startswith(b"retry:")

        async def settled(baseline: int) -> bool:
            return len(asyncio.all_tasks()) <= baseline

        await cycle(0)  # warm up: the first request may create lasting state
        await wait_for(lambda: broadcaster.stats()["totalSubscribers"] == 0)
        await anyio.sleep(0.2)
        baseline = len(asyncio.all_tasks())
        async with anyio.create_task_group() as tg:
            for i in range(CYCLES):
                tg.start_soon(cycle, i)
        await wait_for(lambda: broadcaster.stats()["totalSubscribers"] == 0, 5)
        await wait_for(lambda: len(asyncio.all_tasks()) <= baseline, 5)
        await anyio.sleep(0.2)
        left = len(asyncio.all_tasks()) - baseline
        assert open_streams(broadcaster) == 0
        assert broadcaster.stats()["totalSessions"] == 0  # no event: the rooms were released
    print(f"\n{adapter}: {left} task(s) left after {CYCLES} connect/disconnect cycles")
    assert left == 0
