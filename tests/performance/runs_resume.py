"""Resume latency of resumable runs (#13): C runs stream at once, every reader reloads.

``PYTHONPATH=src python -m tests.performance.runs_resume [--runs-at-once 100] [--rounds 3]``

Serves the demo app on uvicorn (127.0.0.1, in this process), starts C runs of
the simulated token stream at the demo's pacing (a token every 20-60 ms), and
while they stream, reconnects one reader per run at once, each with the
``Last-Event-ID`` of an event in the middle of what its run has published so
far (a page reload). Reported: the time from sending the request to receiving
the first replayed event, p50 / p99 / max over all readers and rounds, and the
replayed events per reader. The readers are raw sockets that read only the
first event, so the figure is the server's. Then the memory a finished run's
transcript holds: C runs of 2,000 tokens retained, RSS and the broadcaster's
own estimate before and after (in-process, memory backend).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import anyio
import psutil

from sse_broadcaster import BroadcasterConfig, EventBroadcaster, RunState
from sse_broadcaster.demo import create_app
from sse_broadcaster.demo.agent import run_session, simulated_answer

from ..support.servers import run_uvicorn


async def _first_event(port: int, name: str, last_event_id: str) -> float:
    """Seconds from sending the reload's request to reading its first replayed event."""
    start = time.perf_counter()
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        request = (
            f"GET /runs/{name}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Accept: text/event-stream\r\nLast-Event-ID: {last_event_id}\r\n\r\n"
        )
        await stream.send(request.encode())
        buffer = b""
        while b"\ndata:" not in buffer:
            buffer += await stream.receive()
        return time.perf_counter() - start


async def _reload(into: list[float], port: int, name: str, last_event_id: str) -> None:
    into.append(await _first_event(port, name, last_event_id))


async def resume_latency(runs_at_once: int, rounds: int) -> list[float]:
    config = BroadcasterConfig(max_runs=runs_at_once * (rounds + 1))
    broadcaster = EventBroadcaster(config)
    app = create_app(broadcaster, ticker_interval=None)
    latencies: list[float] = []
    async with run_uvicorn(app) as running:
        port = int(running.base_url.rsplit(":", 1)[1])
        for r in range(rounds):
            names = [f"r{r}-{i}" for i in range(runs_at_once)]
            for i, name in enumerate(names):
                await broadcaster.start_run(
                    run_session(name), simulated_answer(i, 300), event="token"
                )
            await anyio.sleep(2.0)  # about 50 tokens each: the page has shown some
            ids = []
            for name in names:
                history = await broadcaster.history(run_session(name))
                ids.append(history[len(history) // 2].id)
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for name, last_id in zip(names, ids, strict=True):
                        tg.start_soon(_reload, latencies, port, name, last_id)
            for name in names:
                await broadcaster.cancel_run(run_session(name))
    return latencies


async def transcript_memory(runs: int, tokens: int) -> tuple[float, float]:
    """RSS (MB) and the broadcaster's estimate (MB) that `runs` finished runs add."""
    config = BroadcasterConfig(max_runs=runs, max_run_events=tokens + 10)
    process = psutil.Process()
    async with EventBroadcaster(config) as broadcaster:
        gc.collect()
        rss0 = process.memory_info().rss
        est0 = broadcaster.metrics().broadcaster_memory_estimate_mb
        for i in range(runs):
            await broadcaster.start_run(
                f"mem-{i}", simulated_answer(i, tokens, (0, 0)), event="token"
            )
        while True:
            infos = [await broadcaster.run_info(f"mem-{i}") for i in range(runs)]
            if all(info is not None and info.state is not RunState.RUNNING for info in infos):
                break
            await anyio.sleep(0.05)
        gc.collect()
        rss = (process.memory_info().rss - rss0) / 2**20
        est = broadcaster.metrics().broadcaster_memory_estimate_mb - est0
    return rss, est


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-at-once", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-runs", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    latencies = sorted(await resume_latency(args.runs_at_once, args.rounds))
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"resume after reload, {args.runs_at_once} runs streaming, {len(latencies)} reloads: "
        f"p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms"
    )
    rss, est = await transcript_memory(args.memory_runs, args.tokens)
    print(
        f"{args.memory_runs} finished runs x {args.tokens} tokens retained: "
        f"+{rss:.1f} MB RSS, estimate +{est:.1f} MB "
        f"({rss * 1024 / args.memory_runs:.1f} KB per run)"
    )


if __name__ == "__main__":
    anyio.run(main)
