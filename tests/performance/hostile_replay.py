"""Replays of a large history: what readers and non-readers cost the server.

    python tests/performance/hostile_replay.py [--adapter starlette|aiohttp]
        [--events 500] [--size 60000] [--readers 20] [--silent 40]
        [--send-timeout 10] [--json FILE]

A server subprocess (our Starlette adapter on uvicorn, or our aiohttp
adapter; ``keepalive_interval`` 60 s) publishes a history of ``--events``
events of ``--size`` bytes (500 x 60 kB: ~30 MB) to one session, then:

(a) ``--readers`` clients resume with a bogus ``Last-Event-ID`` (everything
    retained is replayed), read the whole replay, then stay connected, idle;
(b) ``--silent`` raw-socket clients do the same but never read.

The script reports the server's RSS (psutil) at each step, and again after
``gc.collect()`` + ``malloc_trim(0)`` (glibc keeps freed heap pages until
trimmed: the trimmed figure is what is still held), and how long the send
timeout took to drop the silent clients' streams.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve()
BOGUS_ID = "bogus-1"


# -- the server (a subprocess) ----------------------------------------------------------


def _config(events: int, size: int, send_timeout: float) -> Any:
    from sse_broadcaster import BroadcasterConfig

    return BroadcasterConfig(
        send_timeout=send_timeout,
        keepalive_interval=60.0,
        max_history_per_session=events,
        max_event_bytes=size + 1024,
        max_history_bytes=events * (size + 1024),
        max_subscribers_per_session=None,
    )


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def serve_starlette(port: int, events: int, size: int, send_timeout: float) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    import sse_broadcaster.starlette as adapter
    from sse_broadcaster import EventBroadcaster

    broadcaster = EventBroadcaster(_config(events, size, send_timeout))

    async def fill(request: Request) -> JSONResponse:
        for _ in range(events):
            await broadcaster.publish("room", "x" * size)
        return JSONResponse({"open": adapter.open_streams(broadcaster)})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"open": adapter.open_streams(broadcaster)})

    async def trim(request: Request) -> JSONResponse:
        _trim()
        return JSONResponse({})

    app = Starlette(
        routes=[
            Route("/events/{session_id}", adapter.sse_endpoint(broadcaster)),
            Route("/fill", fill, methods=["POST"]),
            Route("/stats", stats),
            Route("/trim", trim, methods=["POST"]),
        ],
        lifespan=adapter.lifespan(broadcaster),
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="critical")


def serve_aiohttp(port: int, events: int, size: int, send_timeout: float) -> None:
    from aiohttp import web

    import sse_broadcaster.aiohttp as adapter
    from sse_broadcaster import EventBroadcaster

    broadcaster = EventBroadcaster(_config(events, size, send_timeout))

    async def fill(request: web.Request) -> web.Response:
        for _ in range(events):
            await broadcaster.publish("room", "x" * size)
        return web.json_response({"open": adapter.open_streams(broadcaster)})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"open": adapter.open_streams(broadcaster)})

    async def trim(request: web.Request) -> web.Response:
        _trim()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/events/{session_id}", adapter.sse_handler(broadcaster))
    app.router.add_post("/fill", fill)
    app.router.add_get("/stats", stats)
    app.router.add_post("/trim", trim)
    adapter.setup(app, broadcaster)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


# -- the clients -------------------------------------------------------------------------


def call(port: int, path: str, method: str = "GET") -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"GET /events/room HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
        + f"Last-Event-ID: {BOGUS_ID}\r\n\r\n".encode()
    )
    return sock


def read_replay(sock: socket.socket, events: int, done: threading.Event) -> None:
    """Read until every replayed event arrived (counted by its ``id:`` line), then idle."""
    seen = 0
    tail = b""
    sock.settimeout(120)
    while seen < events:
        data = sock.recv(1 << 20)
        if not data:
            return
        seen += (tail + data).count(b"\nid: ") + (tail + data).startswith(b"id: ")
        tail = data[-8:]
    done.set()


def wait_open(port: int, count: int, limit: float = 60) -> float:
    start = time.monotonic()
    while call(port, "/stats")["open"] != count:
        if time.monotonic() - start > limit:
            raise SystemExit(f"expected {count} open streams")
        time.sleep(0.05)
    return time.monotonic() - start


def run(
    adapter: str, events: int, size: int, readers: int, silent: int, send_timeout: float
) -> dict[str, Any]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, str(HERE), "--serve", str(port), "--adapter", adapter]
    cmd += ["--events", str(events), "--size", str(size), "--send-timeout", str(send_timeout)]
    proc = subprocess.Popen(cmd)
    rows: list[dict[str, Any]] = []
    socks: list[socket.socket] = []
    try:
        server = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                call(port, "/stats")
                break
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.1)

        def row(label: str, **extra: Any) -> None:
            rss = server.memory_info().rss / 2**20
            call(port, "/trim", "POST")
            rows.append(
                {
                    "step": label,
                    "rss_mb": rss,
                    "rss_trimmed_mb": server.memory_info().rss / 2**20,
                    **extra,
                }
            )

        call(port, "/fill", "POST")
        row(f"history of {events} x {size} B")

        # (a) readers that replay everything, then sit idle.
        flags = [threading.Event() for _ in range(readers)]
        threads = []
        for flag in flags:
            sock = connect(port)
            socks.append(sock)
            thread = threading.Thread(target=read_replay, args=(sock, events, flag), daemon=True)
            thread.start()
            threads.append(thread)
        start = time.monotonic()
        for flag in flags:
            if not flag.wait(300):
                raise SystemExit("a reader did not get its replay")
        row(f"(a) {readers} readers replayed", seconds=time.monotonic() - start)
        time.sleep(2)
        row(f"(a) {readers} readers idle 2 s later")
        for sock in socks:
            sock.close()
        socks.clear()
        wait_open(port, 0)
        row("(a) readers left")

        # (b) clients that never read.
        for _ in range(silent):
            socks.append(connect(port, receive_buffer=4096))
        connected = time.monotonic()
        wait_open(port, silent)
        time.sleep(min(1.0, send_timeout / 4))
        row(f"(b) {silent} silent clients connected")
        wait_open(port, 0, limit=max(120.0, 10 * send_timeout))
        row(
            f"(b) their streams dropped (send_timeout {send_timeout} s)",
            seconds=time.monotonic() - connected,
        )
        for sock in socks:
            sock.close()
        socks.clear()
        time.sleep(1)
        row("(b) silent clients left")
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.wait(30)
    return {"adapter": adapter, "events": events, "size": size, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['adapter']}: history {result['events']} x {result['size']} B",
        "",
        "| step | RSS (MB) | RSS trimmed (MB) | seconds |",
        "|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        seconds = row.get("seconds")
        lines.append(
            f"| {row['step']} | {row['rss_mb']:.0f} | {row['rss_trimmed_mb']:.0f} | "
            f"{'' if seconds is None else f'{seconds:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="starlette", choices=["starlette", "aiohttp"])
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--size", type=int, default=60_000)
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--silent", type=int, default=40)
    parser.add_argument("--send-timeout", type=float, default=10.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()
    if args.serve:
        serve = serve_starlette if args.adapter == "starlette" else serve_aiohttp
        serve(args.serve, args.events, args.size, args.send_timeout)
        return
    result = run(args.adapter, args.events, args.size, args.readers, args.silent, args.send_timeout)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
