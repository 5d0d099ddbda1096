"""Figures of the demo's agent runs over HTTP (#13): how long a run lasts, what a reload costs.

``PYTHONPATH=src python -m tests.performance.runs_replay``: serves the demo app
on uvicorn (127.0.0.1, in this process), starts one run at the default pacing
and times it, then replays finished runs of 300, 2,000 and 20,000 tokens to
20 GETs each (a page reload, no ``Last-Event-ID``) and prints the medians of
the time to the first byte and to the end of the stream, with the bytes sent.
A small non-streaming answer (``GET /runs/NAME``) is timed alongside as the
baseline of one request on this machine.
"""

from __future__ import annotations

import statistics
import time

import anyio
import httpx

from sse_broadcaster import EventBroadcaster, RunState
from sse_broadcaster.demo import create_app, demo_config
from sse_broadcaster.demo.agent import run_session, simulated_answer

from ..support.servers import run_uvicorn

GETS = 20


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms"


async def _finished(broadcaster: EventBroadcaster, name: str) -> None:
    while True:
        info = await broadcaster.run_info(run_session(name))
        if info is not None and info.state is not RunState.RUNNING:
            return
        await anyio.sleep(0.02)


async def main() -> None:
    broadcaster = EventBroadcaster(demo_config())
    app = create_app(broadcaster, ticker_interval=None)
    async with (
        run_uvicorn(app) as running,
        httpx.AsyncClient(base_url=running.base_url, timeout=60) as client,
    ):
        start = time.perf_counter()
        await client.post("/runs/paced", json={"seed": 1})
        await _finished(broadcaster, "paced")
        print(f"a 300-token run at the default pacing: {time.perf_counter() - start:.1f} s")
        baseline = []
        for _ in range(GETS):
            start = time.perf_counter()
            await client.get("/runs/paced")
            baseline.append(time.perf_counter() - start)
        print(f"baseline, GET /runs/NAME (small JSON): {_ms(baseline)}")
        print("| tokens | bytes | first byte | stream closed |")
        print("|---:|---:|---:|---:|")
        for count in (300, 2000, 20000):
            name = f"replay{count}"
            source = simulated_answer(5, count, (0, 0))
            await broadcaster.start_run(run_session(name), source, event="token")
            await _finished(broadcaster, name)
            first: list[float] = []
            closed: list[float] = []
            size = 0
            for _ in range(GETS):
                start = time.perf_counter()
                size = 0
                async with client.stream("GET", f"/runs/{name}/events") as response:
                    async for chunk in response.aiter_bytes():
                        if size == 0:
                            first.append(time.perf_counter() - start)
                        size += len(chunk)
                closed.append(time.perf_counter() - start)
            print(f"| {count:,} | {size:,} | {_ms(first)} | {_ms(closed)} |")


if __name__ == "__main__":
    anyio.run(main)
