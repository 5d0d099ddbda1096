"""What large request headers on open SSE streams cost the server, and which limits refuse them.

    python tests/performance/header_memory.py [--streams 50]
        [--shapes 256x8000,1x2000000] [--setups all|NAME,...] [--json FILE]

A stream holds its request (and so its headers) for as long as it is open: a
client that sends megabytes of headers and then just listens keeps them in
the server's memory. For each setup below a server runs our SSE endpoint in a
subprocess on a free loopback port; it is warmed up (one stream opened and
closed), its RSS is read, then ``--streams`` raw sockets each send
``GET /events/ROOM`` with COUNT headers of SIZE bytes (``--shapes``, e.g.
``256x8000`` is 256 headers of 8000 bytes, about 2 MB) and wait up to 10 s
for the status line. Reported: how many streams were answered 200 (the rest:
the status or "closed"), the server's RSS before and with the streams open,
and the RSS added per stream.

Setups:

- ``uvicorn-h11``: uvicorn ``--http h11`` with its default limit
  (h11's ``max_incomplete_event_size``, 16 KiB, ``--h11-max-incomplete-event-size``);
- ``uvicorn-httptools``: uvicorn ``--http httptools`` (no header limit in uvicorn);
- ``aiohttp``: ``web.run_app`` with aiohttp's defaults (``max_line_size`` and
  ``max_field_size`` 8190, ``max_headers`` 128);
- ``aiohttp-limited``: ``web.run_app(..., max_headers=32)`` (32 x 8190 bytes at most);
- ``nginx-httptools``: nginx (``large_client_header_buffers 4 8k``, the
  default) in front of ``uvicorn-httptools``; RSS is nginx's plus uvicorn's.

Our Starlette adapter (``sse_endpoint``) on uvicorn, our aiohttp adapter
(``sse_handler``) on aiohttp: the routes of ``_servers.py``. Ends by itself.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PY, free_port, http, table
from nginx_matrix import nginx_binary, nginx_version

SETUPS = ["uvicorn-h11", "uvicorn-httptools", "aiohttp", "aiohttp-limited", "nginx-httptools"]
MIB = 1024 * 1024


def serve(setup: str, port: int) -> None:
    """Run one setup's server in this process (the ``--serve`` mode)."""
    from _servers import aiohttp_app, raise_nofile, starlette_app

    raise_nofile()
    if setup.startswith("uvicorn"):
        import uvicorn

        uvicorn.run(
            starlette_app("ours", 0.0),
            host="127.0.0.1",
            port=port,
            http=setup.partition("-")[2],
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
    else:
        from aiohttp import web

        # Keyword arguments of run_app reach the request handler; run_app's
        # handler_args= does not (it is passed on as one unknown keyword).
        limits = {"max_headers": 32} if setup == "aiohttp-limited" else {}
        web.run_app(
            aiohttp_app("ours-aiohttp", 0.0),
            host="127.0.0.1",
            port=port,
            print=None,
            access_log=None,
            shutdown_timeout=2,
            **limits,  # type: ignore[arg-type]
        )


@contextmanager
def server(setup: str) -> Iterator[tuple[int, int]]:
    """The setup's server in a subprocess; yields (port, pid)."""
    port = free_port()
    cmd = [PY, __file__, "--serve", setup, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                http(port, "GET", "/bench/subscribers", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    assert proc.stderr is not None
                    raise RuntimeError(f"{setup} did not start: {proc.stderr.read()}") from None
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


@contextmanager
def nginx(app_port: int) -> Iterator[tuple[int, int, str]]:
    """nginx with its default header buffers in front of app_port; yields (port, pid, version)."""
    binary = nginx_binary()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="header-memory-") as name:
        tmp = Path(name)
        temp = "\n".join(
            f"    {kind}_temp_path {tmp / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (tmp / "nginx.conf").write_text(
            f"""daemon off;
master_process off;
worker_processes 1;
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"} crit;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{app_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
""",
            encoding="utf-8",
        )
        proc = subprocess.Popen([binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf")])
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("nginx did not start") from None
                    time.sleep(0.05)
            yield port, proc.pid, nginx_version(binary)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def size_label(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.0f} KiB"


def rss(pids: list[int]) -> int:
    import psutil

    return sum(int(psutil.Process(pid).memory_info().rss) for pid in pids)


def open_stream(port: int, room: str, count: int, size: int) -> tuple[socket.socket, str]:
    """Send a GET with `count` headers of `size` bytes; answer (socket, status or 'closed')."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    value = "v" * max(1, size - len("X-Pad-0000: "))
    head = f"GET /events/{room} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
    pads = "".join(f"X-Pad-{i:04d}: {value}\r\n" for i in range(count))
    with suppress(OSError):  # a server that refuses may close before reading it all
        sock.sendall((head + pads + "\r\n").encode())
    answer = b""
    with suppress(OSError):
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    line = answer.partition(b"\r\n")[0].decode("latin-1")
    return sock, line.split(" ")[1] if line.startswith("HTTP/") else "closed"


def measure(setup: str, streams: int, count: int, size: int) -> dict[str, Any]:
    with ExitStack() as stack:
        port, pid = stack.enter_context(server(setup.replace("nginx-", "uvicorn-")))
        pids = [pid]
        version = None
        if setup.startswith("nginx"):
            port, nginx_pid, version = stack.enter_context(nginx(port))
            pids.append(nginx_pid)
        warm, status = open_stream(port, "warm", 1, 100)
        assert status == "200", f"{setup}: warm-up stream answered {status}"
        warm.close()
        time.sleep(0.5)
        before = rss(pids)
        socks: list[socket.socket] = []
        statuses: dict[str, int] = {}
        started = time.monotonic()
        for i in range(streams):
            sock, status = open_stream(port, f"room-{i}", count, size)
            socks.append(sock)
            statuses[status] = statuses.get(status, 0) + 1
        elapsed = time.monotonic() - started
        time.sleep(1.0)
        with_streams = rss(pids)
        for sock in socks:
            sock.close()
        return {
            "setup": setup,
            "nginx": version,
            "streams": streams,
            "headers": count,
            "header_size": size,
            "request_bytes": count * size,
            "statuses": statuses,
            "rss_before": before,
            "rss_with_streams": with_streams,
            "added_per_stream": (with_streams - before) / streams,
            "seconds": elapsed,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument(
        "--shapes", default="256x8000,1x2000000", help="COUNTxSIZE of headers, comma-separated"
    )
    parser.add_argument("--setups", default="all", help=f"all or some of {','.join(SETUPS)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--serve", choices=SETUPS[:4], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    setups = SETUPS if args.setups == "all" else args.setups.split(",")
    unknown = set(setups) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups: {sorted(unknown)}")
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    results = [
        measure(setup, args.streams, count, size) for count, size in shapes for setup in setups
    ]
    rows = [
        [
            r["setup"],
            f"{r['headers']} x {r['header_size']} B ({size_label(r['request_bytes'])})",
            ", ".join(f"{n} x {status}" for status, n in sorted(r["statuses"].items())),
            f"{r['rss_before'] / MIB:.1f}",
            f"{r['rss_with_streams'] / MIB:.1f}",
            f"{(r['rss_with_streams'] - r['rss_before']) / MIB:+.1f}",
            f"{r['added_per_stream'] / 1024:.0f}",
        ]
        for r in results
    ]
    versions = next((r["nginx"] for r in results if r["nginx"]), None)
    print(f"{args.streams} streams per row" + (f"; nginx {versions}" if versions else ""))
    print(
        table(
            [
                "setup",
                "headers per request",
                "answers",
                "RSS before (MiB)",
                "RSS with streams (MiB)",
                "added (MiB)",
                "per stream (KiB)",
            ],
            rows,
        )
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
