"""Where a server's CPU goes while it streams paced events to a few clients.

    PYTHONPATH=src python tests/performance/profile_paced.py KIND [CLIENTS]

KIND is one of _servers.py's kinds (ours, sse-starlette, bare, ours-aiohttp,
aiohttp-sse). The server runs as shipped; py-spy samples it (1000 Hz, 7 s,
``--nonblocking``) while CLIENTS raw-socket clients (10 by default) receive
100 events/s (http_e2e.py's paced mode). Printed: p50 / p99 of that run, and
the share of the server's busy samples (``select`` excluded) with each layer
anywhere on the stack, then the top five frames by self time. Issue #14 used
it to explain the paced cells at C=10 where a peer on another server was
ahead: the socket ``send()`` of ``_SelectorSocketTransport.write`` takes most
of every server's busy time there.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Server
from http_e2e import measure_paced, summarise_profile

LAYERS = (
    ("sse_broadcaster (ours)", "sse_broadcaster"),
    ("uvicorn", "uvicorn"),
    ("h11", "h11/"),
    ("starlette", "starlette/"),
    ("aiohttp", "aiohttp/"),
    ("aiohttp_sse", "aiohttp_sse"),
    ("sse_starlette", "sse_starlette"),
    ("socket write", "write (asyncio/selector_events.py"),
    ("publisher (bench)", "publish_loop"),
)


def main() -> None:
    kind = sys.argv[1]
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    out = f"/tmp/profile_paced_{kind}.txt"
    with Server(kind, flush=None) as server:
        command = [py_spy, "record", "--nonblocking", "--format", "raw", "-r", "1000", "-d", "7"]
        spy = subprocess.Popen(
            [*command, "-p", str(server.proc.pid), "-o", out],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        res = measure_paced(server, clients, 5.0, 100.0, "profile")
        spy.wait()
    print(f"{kind}, C={clients}: p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms")
    # The self ranking is http_e2e's; the layers (a pattern anywhere on a busy
    # stack) are this script's own.
    summary = summarise_profile(Path(out), top=5, busy_only=True)
    busy = summary["samples"]
    inclusive: collections.Counter[str] = collections.Counter()
    with open(out) as raw:
        for line in raw:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if "select (selectors.py" in stack.rsplit(";", 1)[-1]:
                continue  # idle: waiting for the next event
            for name, pattern in LAYERS:
                if pattern in stack:
                    inclusive[name] += int(count)
    print(f"busy samples: {busy}")
    for name, n in inclusive.most_common():
        print(f"  on the stack: {name} {n / busy:.0%}")
    for frame, share in summary["self"]:
        print(f"  self: {share:.0f}% {frame}")


if __name__ == "__main__":
    main()
