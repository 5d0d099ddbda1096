"""The nginx configuration of docs/nginx.md, in front of the demo server.

The block marked ``tested config`` is taken from the page as it is (only the
ports change) and run by a real nginx. Needs nginx: the test fails without it
(``apt-get install -y nginx``; .ci/run installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from sse_broadcaster import BroadcasterConfig

from .support.demo_server import serve_demo, sse_events
from .support.servers import free_port

pytestmark = pytest.mark.anyio

DOC = Path(__file__).resolve().parent.parent / "docs" / "nginx.md"
MARKER = "# sse-broadcaster: tested config"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # the demo server runs on uvicorn in the test's loop


def _nginx() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("nginx is missing: apt-get install -y nginx (.ci/run installs it)")


def _documented_config(app_port: int, port: int) -> str:
    blocks = re.findall(r"```nginx\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    tested = [block for block in blocks if block.startswith(MARKER)]
    assert len(tested) == 1, f"docs/nginx.md must have one block starting with {MARKER!r}"
    config = tested[0]
    for old, new in (
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{app_port};"),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
    ):
        assert config.count(old) == 1, f"the tested config must contain {old!r} once"
        config = config.replace(old, new)
    return config


@asynccontextmanager
async def _nginx_in_front(app_url: str, tmp: Path) -> AsyncIterator[str]:
    nginx = _nginx()
    port = free_port()
    app_port = int(app_url.rpartition(":")[2])
    temp = "\n".join(
        f"    {name}_temp_path {tmp / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # A site that compresses everything it can: the streams' location must opt out.
    (tmp / "nginx.conf").write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temp}
    gzip on;
    gzip_types *;
    gzip_min_length 1;
{_documented_config(app_port, port)}
}}
""",
        encoding="utf-8",
    )
    command = [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf")]
    check = await anyio.run_process([*command, "-t"], check=False)
    assert check.returncode == 0, check.stderr.decode()
    async with await anyio.open_process(command) as process:
        try:
            with anyio.fail_after(10):
                while True:
                    try:
                        await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                        break
                    except OSError:
                        await anyio.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            await process.wait()


@pytest.fixture(scope="module")
async def proxied(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    config = BroadcasterConfig(retry_ms=100, keepalive_interval=5.0)
    async with (
        serve_demo(config, ticker_interval=None) as app_url,
        _nginx_in_front(app_url, tmp_path_factory.mktemp("nginx")) as url,
    ):
        yield url


async def test_events_pass_through_one_by_one(proxied: str) -> None:
    room = "through-nginx"
    headers = {"Accept-Encoding": "gzip"}
    async with (
        httpx.AsyncClient(base_url=proxied, timeout=10) as client,
        aconnect_sse(client, "GET", f"/events/{room}", headers=headers) as source,
        sse_events(source) as events,
    ):
        assert source.response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert "content-encoding" not in source.response.headers
        for n in range(3):
            started = time.monotonic()
            answer = await client.post(f"/publish/{room}", json={"data": f"event {n}"})
            with anyio.fail_after(2):
                sse = await events.__anext__()
            # Each event arrives on its own, long before a proxy buffer (4-8 KiB) fills.
            assert (sse.id, sse.data) == (answer.json()["id"], f"event {n}")
            assert time.monotonic() - started < 1.0


async def test_other_routes_are_still_compressed(proxied: str) -> None:
    async with httpx.AsyncClient(base_url=proxied) as client:
        stats = await client.get("/stats", headers={"Accept-Encoding": "gzip"})
    assert stats.headers.get("content-encoding") == "gzip"
    assert "totalSessions" in stats.json()


async def test_last_event_id_reaches_the_app(proxied: str) -> None:
    room = "replay-through-nginx"
    async with httpx.AsyncClient(base_url=proxied, timeout=10) as client:
        ids = [
            (await client.post(f"/publish/{room}", json={"data": n})).json()["id"] for n in range(3)
        ]
        headers = {"Last-Event-ID": ids[0]}
        async with (
            aconnect_sse(client, "GET", f"/events/{room}", headers=headers) as source,
            sse_events(source) as events,
        ):
            with anyio.fail_after(2):
                got = [await events.__anext__() for _ in range(2)]
    assert [(sse.event, sse.id, sse.data) for sse in got] == [
        ("message", ids[1], "1"),
        ("message", ids[2], "2"),
    ]


MATRIX = Path(__file__).resolve().parent / "performance" / "nginx_matrix.py"
# Rows of the measured table in docs/nginx.md re-run here: the directive alone (A),
# the adapter's X-Accel-Buffering header alone (C, I), and the two ways to hold
# events that the page warns about (F: buffering and gzip; K: buffering on an
# HTTP/1.0 upstream).
KEY_ROWS = ["A", "C", "F", "I", "K"]


def _documented_verdicts() -> dict[str, str]:
    """Row key -> "streamed" or "held", as the measured table of docs/nginx.md says."""
    verdicts = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 8 and re.fullmatch(r"[A-Z]", cells[0]):
            verdicts[cells[0]] = "held" if "held" in cells[-1] else "streamed"
    return verdicts


async def test_the_measured_table_holds(tmp_path: Path) -> None:
    """The key rows of the page's table, measured again with real nginx and uvicorn."""
    _nginx()
    documented = _documented_verdicts()
    assert set(KEY_ROWS) <= set(documented), "docs/nginx.md lost rows of its measured table"
    out = tmp_path / "matrix.json"
    command = [sys.executable, str(MATRIX), "--rows", ",".join(KEY_ROWS), "--hold", "1.5"]
    with anyio.fail_after(120):
        result = await anyio.run_process(
            [*command, "--fill-max", "256", "--json", str(out)], check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    measured = {row["key"]: row for row in json.loads(out.read_text())["rows"]}
    assert {key: measured[key]["verdict"] for key in KEY_ROWS} == {
        key: documented[key] for key in KEY_ROWS
    }
    # Held means held until a buffer fills (kilobytes), not lost: more events push it out.
    for key in KEY_ROWS:
        if documented[key] == "held":
            assert measured[key]["released_kib"] is not None, measured[key]
        else:
            assert measured[key]["ms"] < 1000, measured[key]
