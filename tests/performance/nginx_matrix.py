"""Which nginx settings stream SSE events and which hold them back, measured.

    python tests/performance/nginx_matrix.py [--rows A,B,...] [--hold 2.0]
        [--fill-max 1024] [--json FILE]

Starts, in a temporary directory and on free loopback ports, our Starlette
adapter on uvicorn (``_servers.py ours``, h11) and one nginx (``daemon off``)
with one ``location /ROW/`` per configuration below, all proxying to it. For
each row a raw-socket client opens ``/ROW/events/ROOM`` through nginx (HTTP/1.1,
``Accept-Encoding: gzip``; it de-chunks and gunzips what arrives), one event
is published straight to the upstream, and the time until the client has it is
measured:

- ``streamed`` within N ms: the event arrived within ``--hold`` seconds;
- ``held``: it did not. Then events of 4 KiB of random text are published
  into the room until the first one comes out, and the row reports how much
  had to be published to push it through (the buffer filling up), or that
  ``--fill-max`` KiB did not.

The adapter sends ``X-Accel-Buffering: no`` on every stream; rows with
"header ignored" add ``proxy_ignore_headers X-Accel-Buffering`` so that
``proxy_buffering`` decides. Prints a Markdown table (and the nginx version);
``--json`` writes the rows too. Ends by itself; stops nginx and the upstream.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Server, free_port, table


@dataclass(frozen=True)
class Row:
    """One nginx configuration of the streams' location."""

    key: str
    upstream: str  # proxy_http_version: "1.0" (nginx's default) or "1.1"
    buffering: str  # "off" (directive), "header" (on, X-Accel-Buffering honoured), "on"
    gzip: bool  # gzip on for text/event-stream
    ignore: str = ""  # upstream headers ignored besides X-Accel-Buffering (buffering "on")
    extra: str = ""  # further directives, verbatim

    def directives(self) -> list[str]:
        lines = [f"proxy_http_version {self.upstream};"]
        if self.upstream == "1.1":
            lines.append('proxy_set_header Connection "";')
        if self.buffering == "off":
            lines.append("proxy_buffering off;")
        else:
            lines.append("proxy_buffering on;")
        ignored = [*self.ignore.split(), *(["X-Accel-Buffering"] if self.buffering == "on" else [])]
        if ignored:
            lines.append(f"proxy_ignore_headers {' '.join(ignored)};")
        if self.gzip:
            lines += ["gzip on;", "gzip_types text/event-stream;", "gzip_min_length 1;"]
        else:
            lines.append("gzip off;")
        if self.extra:
            lines += [line.strip() for line in self.extra.split(";") if line.strip()]
            lines = [line if line.endswith(";") else line + ";" for line in lines]
        return lines

    def buffering_label(self) -> str:
        return {
            "off": "`proxy_buffering off`",
            "header": "on, `X-Accel-Buffering: no` honoured",
            "on": "on, header ignored",
        }[self.buffering]


#: A cache zone that would store the stream (its Cache-Control: no-cache ignored).
CACHE = "proxy_cache sse; proxy_cache_valid 200 1m"

ROWS: list[Row] = [
    Row(
        "A",
        "1.1",
        "off",
        False,
    ),
    Row("B", "1.1", "off", True),
    Row("C", "1.1", "header", False),
    Row("D", "1.1", "header", True),
    Row("E", "1.1", "on", False),
    Row("F", "1.1", "on", True),
    Row("G", "1.0", "off", False),
    Row("H", "1.0", "off", True),
    Row("I", "1.0", "header", False),
    Row("J", "1.0", "header", True),
    Row("K", "1.0", "on", False),
    Row("L", "1.0", "on", True),
    Row("M", "1.1", "off", False, extra="chunked_transfer_encoding off"),
    Row("N", "1.1", "on", False, ignore="Cache-Control", extra=CACHE),
    Row("O", "1.1", "header", False, ignore="Cache-Control", extra=CACHE),
    Row("P", "1.0", "header", False, ignore="Cache-Control", extra=CACHE),
]


def nginx_binary() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit("nginx is missing: apt-get install -y nginx")


def nginx_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True)
    return out.stderr.strip().rpartition("/")[2]


def nginx_conf(tmp: Path, port: int, app_port: int, rows: list[Row]) -> str:
    """One server with a ``location /KEY/`` per row; /KEY/ is stripped upstream."""
    temp = "\n".join(
        f"    {name}_temp_path {tmp / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    locations = "\n".join(
        f"        location /{row.key}/ {{\n            proxy_pass http://sse_app/;\n"
        + "".join(f"            {line}\n" for line in row.directives())
        + "        }"
        for row in rows
    )
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temp}
    proxy_cache_path {tmp / "cache"} keys_zone=sse:1m;
    proxy_read_timeout 1h;
    upstream sse_app {{
        server 127.0.0.1:{app_port};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
{locations}
    }}
}}
"""


@contextmanager
def run_nginx(app_port: int, rows: list[Row]) -> Iterator[tuple[int, str]]:
    """nginx in a temporary directory in front of app_port; yields (port, version)."""
    binary = nginx_binary()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="nginx-matrix-") as name:
        tmp = Path(name)
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, port, app_port, rows), encoding="utf-8")
        command = [binary, "-p", str(tmp), "-c", str(conf)]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"nginx -t failed:\n{check.stderr}")
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"nginx did not start: {proc.stderr.read()}") from None
                    time.sleep(0.05)
            yield port, nginx_version(binary)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()


class StreamClient:
    """An SSE request through nginx on a raw socket; a thread decodes what arrives.

    ``body`` grows with the de-chunked, gunzipped bytes; ``arrivals`` keeps
    (time, len(body)) after each decoded read, so the arrival time of any
    offset can be looked up.
    """

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(None)
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            "Accept-Encoding: gzip\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.body = bytearray()
        self.arrivals: list[tuple[float, int]] = []
        self.headers: dict[str, str] = {}
        self.closed = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        raw = b""
        head_done = False
        chunked = False
        inflate: Any = None
        pending = b""  # undecoded chunked framing
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                now = time.monotonic()
                if not head_done:
                    raw += data
                    if b"\r\n\r\n" not in raw:
                        continue
                    head, _, data = raw.partition(b"\r\n\r\n")
                    for line in head.decode("latin-1").split("\r\n")[1:]:
                        name, _, value = line.partition(":")
                        self.headers[name.strip().lower()] = value.strip()
                    chunked = self.headers.get("transfer-encoding", "") == "chunked"
                    if self.headers.get("content-encoding") == "gzip":
                        inflate = zlib.decompressobj(wbits=31)
                    head_done = True
                payload = b""
                if chunked:
                    pending += data
                    while True:
                        line, sep, rest = pending.partition(b"\r\n")
                        if not sep:
                            break
                        size = int(line.split(b";")[0], 16)
                        if len(rest) < size + 2:
                            break
                        payload += rest[:size]
                        pending = rest[size + 2 :]
                else:
                    payload = data
                if inflate is not None:
                    payload = inflate.decompress(payload)
                if payload:
                    with self.changed:
                        self.body += payload
                        self.arrivals.append((now, len(self.body)))
                        self.changed.notify_all()
        except OSError:
            pass
        finally:
            with self.changed:
                self.closed = True
                self.changed.notify_all()

    def wait_for(self, token: bytes, timeout: float) -> float | None:
        """The monotonic time the bytes holding `token` arrived, or None after timeout."""
        with self.changed:
            found = self.changed.wait_for(
                lambda: token in self.body or self.closed, timeout=timeout
            )
            index = self.body.find(token)
            if not found or index < 0:
                return None
            end = index + len(token)
            return next(at for at, length in self.arrivals if length >= end)

    def close(self) -> None:
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def publish(app_port: int, room: str, body: bytes) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{app_port}/publish/{room}", data=body)
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def measure(server: Server, port: int, row: Row, hold: float, fill_max_kib: int) -> dict[str, Any]:
    room = f"matrix-{row.key}-{os.getpid()}"
    before = server.subscribers()
    client = StreamClient(port, f"/{row.key}/events/{room}")
    try:
        server.wait_subscribers(1, baseline=before, timeout=10)
        token = f"token-{row.key}-{time.time_ns()}".encode()
        started = time.monotonic()
        publish(server.port, room, token)
        arrived = client.wait_for(token, hold)
        result: dict[str, Any] = {
            "key": row.key,
            "upstream": row.upstream,
            "buffering": row.buffering,
            "gzip": row.gzip,
            "extra": row.extra,
            "content_encoding": None,
        }
        if arrived is not None:
            result.update(verdict="streamed", ms=(arrived - started) * 1000, released_kib=0)
        else:
            filled = 0
            filler = 4096
            while arrived is None and filled < fill_max_kib * 1024:
                text = base64.b64encode(os.urandom(filler * 3 // 4))
                publish(server.port, room, text)
                filled += len(text)
                arrived = client.wait_for(token, 0.05)
            result.update(
                verdict="held",
                ms=None,
                released_kib=filled // 1024 if arrived is not None else None,
            )
        result["content_encoding"] = client.headers.get("content-encoding")
        result["chunked"] = client.headers.get("transfer-encoding") == "chunked"
        return result
    finally:
        client.close()
        deadline = time.monotonic() + 10
        while server.subscribers() > before and time.monotonic() < deadline:
            time.sleep(0.05)


def describe(result: dict[str, Any], hold: float, fill_max_kib: int) -> str:
    if result["verdict"] == "streamed":
        return f"streamed in {result['ms']:.1f} ms"
    if result["released_kib"] is None:
        return f"**held** (> {hold:g} s; still held after {fill_max_kib} KiB more)"
    return f"**held** (> {hold:g} s; out after {result['released_kib']} KiB more)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="", help="comma-separated row keys (default: all)")
    parser.add_argument("--hold", type=float, default=2.0, help="seconds before 'held'")
    parser.add_argument(
        "--fill-max", type=int, default=1024, help="KiB published to push a held event out"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    wanted = [key for key in args.rows.split(",") if key]
    rows = [row for row in ROWS if not wanted or row.key in wanted]
    if wanted and len(rows) != len(set(wanted)):
        parser.error(f"unknown rows: {sorted(set(wanted) - {row.key for row in rows})}")
    results = []
    with Server("ours") as server, run_nginx(server.port, rows) as (port, version):
        for row in rows:
            results.append(measure(server, port, row, args.hold, args.fill_max))
    lines = [
        [
            row.key,
            row.upstream,
            row.buffering_label(),
            "on" if row.gzip else "off",
            f"`{row.extra}`" + (f", ignores `{row.ignore}`" if row.ignore else "")
            if row.extra
            else "",
            "yes" if result["chunked"] else "no",
            result["content_encoding"] or "",
            describe(result, args.hold, args.fill_max),
        ]
        for row, result in zip(rows, results, strict=True)
    ]
    header = [
        "row",
        "proxy_http_version",
        "buffering",
        "gzip (event-stream)",
        "other",
        "chunked to client",
        "Content-Encoding",
        "first event",
    ]
    print(f"nginx {version}, upstream: uvicorn (h11) + sse_broadcaster.starlette")
    print(table(header, lines))
    if args.json:
        args.json.write_text(
            json.dumps({"nginx": version, "hold": args.hold, "rows": results}, indent=2)
        )


if __name__ == "__main__":
    main()
