"""The reference document's four scenarios, in-process and over HTTP, side by side.

    python tests/performance/seed_scenarios.py [--runs 3] [--quick | --smoke] [--json FILE]

Scenarios (what is timed: from the first publish until every subscriber has
received every event meant for it; one subscriber per session unless said):

- sustained: 5 sessions x 500 events; the 2,500 events are published
  round-robin over the sessions, yielding to the loop every 100 publishes;
- burst: 1 session, 5 bursts of 200 events; a burst is published at once and
  the next starts when the subscriber has received the previous one;
- many sessions: 50 sessions x 20 events (1,000 events, round-robin);
- concurrent: 10 subscribers on one session; 10 publishes issued in parallel
  (in-process: 10 concurrent tasks; over HTTP: 10 parallel ``POST
  /publish/{room}`` requests on a warm httpx pool); until all 10 subscribers
  have the 10 events.

In-process: ``EventBroadcaster`` (default config) against encode/broadcaster's
``Broadcast("memory://")``, each in a fresh subprocess.

Over HTTP: each stack is a server subprocess (tests/performance/_servers.py):
our Starlette adapter on uvicorn (h11), sse-starlette + encode/broadcaster on
uvicorn, our aiohttp adapter and aiohttp-sse + encode/broadcaster on aiohttp.
The subscribers are SSE streams read by this process (asyncio sockets that
count the ``@@`` marker of each event); publishing happens inside the server
through ``POST /bench/publish`` (one request per burst / per scenario), except
in "concurrent", which makes real publish requests. Stacks alternate their
order from run to run; figures are medians of --runs runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Server,
    available,
    median,
    progress,
    save_results,
    stamp,
    table,
)

SCENARIOS = ["sustained", "burst", "many_sessions", "concurrent"]
REFERENCE = {"sustained": 0.48, "burst": 0.62, "many_sessions": 1.02, "concurrent": 0.02}
LABELS = {
    "sustained": "Sustained (5 sessions x 500 events)",
    "burst": "Burst (200 events x 5 bursts)",
    "many_sessions": "Many sessions (50 x 20 events)",
    "concurrent": "Concurrent (10 parallel publishes, 10 subscribers)",
}
INPROC = ["ours", "encode"]
HTTP_STACKS = ["ours", "sse-starlette", "ours-aiohttp", "aiohttp-sse"]
PAYLOAD = "@@0.0;" + "x" * 94


# -- in-process ----------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.n = 0
        self.target = 0
        self.reached = asyncio.Event()

    def expect(self, target: int) -> None:
        self.target = target
        if self.n >= target:
            self.reached.set()
        else:
            self.reached.clear()

    def add(self, k: int = 1) -> None:
        self.n += k
        if self.n >= self.target:
            self.reached.set()


async def _inproc(impl: str, scenario: str, scale: float) -> float:
    ctx: Any
    if impl == "ours":
        from sse_broadcaster import EventBroadcaster

        ctx = EventBroadcaster()
    else:
        from broadcaster import Broadcast

        ctx = Broadcast("memory://")

    # Both take (room, data) to publish and subscribe(room) as an async context
    # manager that yields something to iterate.
    async def publish(room: str) -> None:
        await ctx.publish(room, PAYLOAD)

    async def consume(room: str, counter: _Counter, ready: asyncio.Event) -> None:
        async with ctx.subscribe(room) as sub:
            ready.set()
            async for _ in sub:
                counter.add()

    sessions, events, subs_per = _shape(scenario, scale)
    async with ctx:
        rooms = [f"{scenario}-{i}" for i in range(sessions)]
        counters = []
        tasks = []
        for room in rooms:
            for _ in range(subs_per):
                counter, ready = _Counter(), asyncio.Event()
                counters.append(counter)
                tasks.append(asyncio.ensure_future(consume(room, counter, ready)))
                await ready.wait()
        await asyncio.sleep(0.02)
        start = time.perf_counter()
        if scenario == "burst":
            per = events // 5
            for b in range(5):
                counters[0].expect(per * (b + 1))
                for _ in range(per):
                    await publish(rooms[0])
                await counters[0].reached.wait()
        elif scenario == "concurrent":
            for c in counters:
                c.expect(events)
            await asyncio.gather(*(publish(rooms[0]) for _ in range(events)))
            for c in counters:
                await c.reached.wait()
        else:
            for c in counters:
                c.expect(events)
            i = 0
            for _ in range(events):
                for room in rooms:
                    await publish(room)
                    i += 1
                    if i % 100 == 0:
                        await asyncio.sleep(0)
            for c in counters:
                await c.reached.wait()
        elapsed = time.perf_counter() - start
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return elapsed


def _shape(scenario: str, scale: float) -> tuple[int, int, int]:
    """(sessions, events per session, subscribers per session)."""
    s = max(scale, 0.01)
    return {
        "sustained": (5, max(5, int(500 * s)), 1),
        "burst": (1, max(5, int(1000 * s)) // 5 * 5, 1),
        "many_sessions": (50, max(2, int(20 * s)), 1),
        "concurrent": (1, 10, 10),
    }[scenario]


def inproc_child(impl: str, scale: float) -> None:
    out = {s: asyncio.run(_inproc(impl, s, scale)) for s in SCENARIOS}
    print(json.dumps(out))


# -- over HTTP -----------------------------------------------------------------------


class _Stream:
    """One SSE connection read by this process, counting the events' markers."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path
        self.counter = _Counter()
        self.task: asyncio.Task[None] | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer = writer
        writer.write(
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200" not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"stream answered {head!r}")
        self.task = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        tail = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buf = tail + data
            tail = buf[-1:] if buf.endswith(b"@") else b""
            self.counter.add((buf[:-1] if tail else buf).count(b"@@"))

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
        if self.writer:
            self.writer.close()


async def _http_scenarios(port: int, scale: float) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

        async def subscribers() -> int:
            return int((await client.get("/bench/subscribers")).json()["subscribers"])

        async def settled() -> int:
            # Until the streams of the previous scenario are gone (or stay, as
            # aiohttp-sse's do until their next ping).
            last, same = await subscribers(), 0
            while last and same < 5:
                await asyncio.sleep(0.02)
                now = await subscribers()
                same = same + 1 if now == last else 0
                last = now
            return last

        async def control(rooms: list[str], n: int) -> None:
            query = {"rooms": ",".join(rooms), "n": n, "size": 100}
            (await client.post("/bench/publish", params=query)).raise_for_status()

        await asyncio.gather(*(client.get("/bench/subscribers") for _ in range(10)))
        for scenario in SCENARIOS:
            sessions, events, subs_per = _shape(scenario, scale)
            tag = f"{scenario}-{time.monotonic_ns()}"
            rooms = [f"{tag}-{i}" for i in range(sessions)]
            streams = [_Stream(port, f"/events/{room}") for room in rooms for _ in range(subs_per)]
            # aiohttp-sse notices a client that left only at its next write (a
            # ping, 15 s later): count from what is subscribed now.
            baseline = await settled()
            await asyncio.gather(*(s.open() for s in streams))
            while await subscribers() < baseline + len(streams):
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            if scenario == "burst":
                per = events // 5
                for b in range(5):
                    streams[0].counter.expect(per * (b + 1))
                    await control(rooms, per)
                    await streams[0].counter.reached.wait()
            elif scenario == "concurrent":
                for s in streams:
                    s.counter.expect(events)
                await asyncio.gather(
                    *(client.post(f"/publish/{rooms[0]}", content=b"x" * 94) for _ in range(events))
                )
            else:
                for s in streams:
                    s.counter.expect(events)
                await control(rooms, events)
            for s in streams:
                await asyncio.wait_for(s.counter.reached.wait(), 60)
            out[scenario] = time.perf_counter() - start
            for s in streams:
                await s.close()
    return out


# -- driver --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    global INPROC, HTTP_STACKS
    missing = [k for k in [*INPROC, *HTTP_STACKS] if not available(k)]
    INPROC = [k for k in INPROC if k not in missing]
    HTTP_STACKS = [k for k in HTTP_STACKS if k not in missing]
    inproc: dict[str, dict[str, list[float]]] = {i: {s: [] for s in SCENARIOS} for i in INPROC}
    over: dict[str, dict[str, list[float]]] = {i: {s: [] for s in SCENARIOS} for i in HTTP_STACKS}
    steps = args.runs * (len(INPROC) + len(HTTP_STACKS))
    with progress(steps, "seed_scenarios", not args.no_progress) as bar:
        for r in range(args.runs):
            for impl in INPROC if r % 2 == 0 else INPROC[::-1]:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", impl, "--scale", str(args.scale)],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=600,
                )
                for s, v in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                    inproc[impl][s].append(v)
                bar.update()
            for stack in HTTP_STACKS if r % 2 == 0 else HTTP_STACKS[::-1]:
                with Server(stack) as server:
                    for s, v in asyncio.run(_http_scenarios(server.port, args.scale)).items():
                        over[stack][s].append(v)
                bar.update()
    result: dict[str, Any] = {
        "inproc": {},
        "http": {},
        "runs": {"inproc": inproc, "http": over},
        "missing": missing,
    }
    for impl in INPROC:
        result["inproc"][impl] = {s: median(inproc[impl][s]) for s in SCENARIOS}
    for stack in HTTP_STACKS:
        result["http"][stack] = {s: median(over[stack][s]) for s in SCENARIOS}
    return result


def markdown(result: dict[str, Any]) -> str:
    nan = float("nan")

    def ms(v: float) -> str:
        return "n/a" if v != v else f"{v * 1000:.1f} ms"

    def pick(where: str, impl: str, s: str) -> float:
        return float(result[where].get(impl, {}).get(s, nan))

    def ratio(peer: float, ours: float) -> str:
        return "n/a" if peer != peer or ours != ours else f"{peer / ours:.1f}x"

    rows = []
    for s in SCENARIOS:
        cells = [LABELS[s], f"{REFERENCE[s]:.2f} s"]
        for where, ours, peer in (
            ("inproc", "ours", "encode"),
            ("http", "ours", "sse-starlette"),
            ("http", "ours-aiohttp", "aiohttp-sse"),
        ):
            a, b = pick(where, ours, s), pick(where, peer, s)
            cells += [ms(a), ms(b), ratio(b, a)]
        rows.append(cells)
    header = [
        "scenario",
        "reference claim",
        "ours in-process",
        "encode/broadcaster",
        "speed-up",
        "ours, Starlette/uvicorn",
        "sse-starlette + broadcaster",
        "speed-up",
        "ours, aiohttp",
        "aiohttp-sse + broadcaster",
        "speed-up",
    ]
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        inproc_child(args.child, args.scale)
        return
    if args.smoke:
        args.runs, args.scale, args.no_progress = 1, 0.1, True
    elif args.quick:
        args.runs = 1
    result = run(args)
    stamp(result, "seed_scenarios.py")
    md = markdown(result)
    save_results("seed_scenarios", result, md, smoke=args.smoke, json_path=args.json)


if __name__ == "__main__":
    main()
