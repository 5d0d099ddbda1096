"""Clients that never read: what a dropped stream leaves behind on uvicorn.

    python tests/performance/hostile_slow_readers.py [--http h11|httptools]
        [--loop asyncio|uvloop] [--waves 8] [--clients 50] [--no-abort] [--json FILE]

A server subprocess (our Starlette adapter on uvicorn, ``send_timeout`` 0.5 s)
gets waves of raw-socket clients that send their request and never read.
Each wave publishes bursts of 40 events of 60 kB until the send timeout has
dropped every stream of the wave. After each wave, and once more after the
attacker has closed all its sockets, the script reads the server's ESTABLISHED
sockets on its port (psutil, the server's pid) and its RSS, then the RSS again
after ``malloc_trim(0)`` (glibc keeps freed heap pages until trimmed: the
trimmed figure is what is still held).

``--no-abort`` turns off the adapter's abort of a dropped stream's connection
(the behaviour before it existed), for the before/after comparison.
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
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve()


# -- the server (a subprocess) ----------------------------------------------------------


def serve(port: int, http: str, loop: str, abort: bool) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    import sse_broadcaster.starlette as adapter
    from sse_broadcaster import BroadcasterConfig, EventBroadcaster

    if not abort:
        adapter._abort = lambda transport: False  # type: ignore[assignment]
    broadcaster = EventBroadcaster(
        BroadcasterConfig(
            send_timeout=0.5,
            max_history_per_session=4,
            max_subscribers_per_session=None,
            max_queue_size=100_000,
            max_queue_bytes=512 * 2**20,
        )
    )

    async def burst(request: Request) -> JSONResponse:
        n, size = int(request.query_params["n"]), int(request.query_params["size"])
        for _ in range(n):
            await broadcaster.publish("room", "x" * size)
        return JSONResponse({"open": adapter.open_streams(broadcaster)})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"open": adapter.open_streams(broadcaster)})

    async def trim(request: Request) -> JSONResponse:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        return JSONResponse({})

    app = Starlette(
        routes=[
            Route("/events/{session_id}", adapter.sse_endpoint(broadcaster)),
            Route("/burst", burst, methods=["POST"]),
            Route("/stats", stats),
            Route("/trim", trim, methods=["POST"]),
        ],
        lifespan=adapter.lifespan(broadcaster),
    )
    uvicorn.run(app, host="127.0.0.1", port=port, http=http, loop=loop, log_level="critical")


# -- the attacker ------------------------------------------------------------------------


def call(port: int, path: str, method: str = "GET") -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def silent_client(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /events/room HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    return sock


def established(server: psutil.Process, port: int) -> int:
    return sum(
        1
        for conn in server.net_connections(kind="tcp")
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_ESTABLISHED
    )


def wait_open(port: int, count: int, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while call(port, "/stats")["open"] != count:
        if time.monotonic() > deadline:
            raise SystemExit(f"expected {count} open streams")
        time.sleep(0.05)


def run(http: str, loop: str, waves: int, clients: int, abort: bool) -> dict[str, Any]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, str(HERE), "--serve", str(port), "--http", http, "--loop", loop]
    proc = subprocess.Popen(cmd + ([] if abort else ["--no-abort"]))
    socks: list[socket.socket] = []
    rows: list[dict[str, Any]] = []
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
        call(port, "/trim", "POST")
        start_mb = server.memory_info().rss / 2**20
        for wave in range(1, waves + 1):
            socks += [silent_client(port) for _ in range(clients)]
            wait_open(port, clients)
            deadline = time.monotonic() + 60
            while call(port, "/burst?n=40&size=60000", "POST")["open"]:
                if time.monotonic() > deadline:
                    raise SystemExit("the send timeout did not drop the streams")
                time.sleep(0.05)
            time.sleep(0.5)  # let the server finish dropping them
            rows.append(
                {
                    "after": f"wave {wave} ({len(socks)} clients, not reading)",
                    "established": established(server, port),
                    "rss_mb": server.memory_info().rss / 2**20,
                }
            )
        call(port, "/trim", "POST")
        rows[-1]["rss_trimmed_mb"] = server.memory_info().rss / 2**20
        for sock in socks:
            sock.close()
        socks.clear()
        time.sleep(2)
        rows.append(
            {
                "after": "the attacker left",
                "established": established(server, port),
                "rss_mb": server.memory_info().rss / 2**20,
            }
        )
        call(port, "/trim", "POST")
        rows[-1]["rss_trimmed_mb"] = server.memory_info().rss / 2**20
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.wait(30)
    return {"http": http, "loop": loop, "abort": abort, "start_rss_mb": start_mb, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    mode = "abort (this version)" if result["abort"] else "no abort (before)"
    lines = [
        f"uvicorn --http {result['http']} --loop {result['loop']}, {mode}; server RSS at start "
        f"{result['start_rss_mb']:.0f} MB",
        "",
        "| after | ESTABLISHED | RSS (MB) | RSS trimmed (MB) |",
        "|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        trimmed = row.get("rss_trimmed_mb")
        lines.append(
            f"| {row['after']} | {row['established']} | {row['rss_mb']:.0f} | "
            f"{'' if trimmed is None else f'{trimmed:.0f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", default="h11", choices=["h11", "httptools"])
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument("--waves", type=int, default=8)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--no-abort", action="store_true")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.http, args.loop, not args.no_abort)
        return
    result = run(args.http, args.loop, args.waves, args.clients, not args.no_abort)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
