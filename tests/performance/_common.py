"""Helpers shared by the benchmarks: servers in subprocesses, raw-socket SSE
clients in subprocesses, medians, Markdown tables, the machine description.

The SSE clients (``python tests/performance/_common.py --client SPEC``) are
meant to be cheaper than any server they measure: one process holds many
non-blocking sockets on one epoll selector, and per read it only counts the
``@@`` markers that every benchmark event carries (and, in latency mode,
parses the publish time that follows each marker). They never parse SSE.

By default a client process measures one window and exits. In step mode
(``Clients(..., steps=True)``) it keeps its connections open and measures one
window per `Clients.go` + `Clients.step_results`, answering each with a
latency histogram (0.1 ms buckets) rather than every latency, until
`Clients.close`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = HERE / "results"
SERVERS = HERE / "_servers.py"
PY = sys.executable
MARKER = b"@@"
_STAMP = re.compile(rb"@@(\d+\.\d+);")


# -- machine and results --------------------------------------------------------------


def versions(names: Sequence[str] = ()) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    wanted = list(names) or [
        "sse-broadcaster",
        "anyio",
        "starlette",
        "uvicorn",
        "h11",
        "httptools",
        "uvloop",
        "aiohttp",
        "broadcaster",
        "sse-starlette",
        "aiohttp-sse",
        "locust",
    ]
    found = {}
    for name in wanted:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg": os.getloadavg(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write_json(name: str, data: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=float))
    return path


def write_text(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    return path


def stamp(result: dict[str, Any], script: str) -> None:
    """Record the machine and the exact command in a benchmark's result."""
    result["machine"] = machine()
    result["command"] = " ".join(["python", f"tests/performance/{script}", *sys.argv[1:]])


def save_results(
    name: str, result: dict[str, Any], md: str, *, smoke: bool, json_path: str | None
) -> None:
    """Print the Markdown and write JSON + Markdown under results/ (and to `json_path`)."""
    print(md)
    stem = f"{name}-smoke" if smoke else name
    write_json(stem, result)
    write_text(f"{stem}.md", md)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=float))


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v is not None and v == v]
    return statistics.median(clean) if clean else float("nan")


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def hist_quantile(hist: dict[int, int], q: float, unit: float = 1e-4) -> float:
    """The `q` quantile of a histogram of bucket -> count, buckets `unit` wide
    (the upper edge of the bucket it falls in)."""
    total = sum(hist.values())
    if not total:
        return float("nan")
    rank = min(total - 1, int(q * total))
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen > rank:
            break
    return (bucket + 1) * unit


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.{digits}f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.0f}k"
    return f"{value:.{digits}f}"


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar on stderr (a no-op object when tqdm is missing or disabled)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is None or not enabled:

        class _Null:
            def update(self, n: int = 1) -> None:
                pass

            def set_postfix_str(self, s: str) -> None:
                pass

        yield _Null()
        return
    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- what is installed --------------------------------------------------------------

# The modules each stack needs. The peers come with the ``bench`` extra; a
# stack whose modules are missing is left out of a run (and listed as missing).
NEEDS = {
    "ours": ["starlette", "uvicorn"],
    "bare": ["starlette", "uvicorn"],
    "sse-starlette": ["starlette", "uvicorn", "sse_starlette", "broadcaster"],
    "ours-aiohttp": ["aiohttp"],
    "aiohttp-sse": ["aiohttp", "aiohttp_sse", "broadcaster"],
    "encode": ["broadcaster"],
    "harness": [],
    "httptools": ["httptools", "uvloop"],
}


def available(*names: str) -> bool:
    """True when every module the named stacks (or extras) need can be imported."""
    import importlib.util

    return all(
        importlib.util.find_spec(module) is not None
        for name in names
        for module in NEEDS.get(name, [name])
    )


# -- servers --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(port: int, method: str, path: str, body: bytes = b"", timeout: float = 120) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body or None)
    request.method = method
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class Server:
    """A benchmark server (tests/performance/_servers.py) in a subprocess."""

    def __init__(
        self,
        kind: str,
        *,
        http_impl: str = "h11",
        loop: str = "asyncio",
        flush: float | None = 0.0,
        profile: str | None = None,
        script: Path = SERVERS,
    ) -> None:
        """`flush`: our adapters' flush_window; None runs them with their default.

        `script` serves `kind` with the same command line and routes as
        _servers.py (``/bench/subscribers``, ``/bench/publish``, ``/events/{room}``).
        """
        self.kind = kind
        self.port = free_port()
        cmd = [PY, str(script), kind, "--port", str(self.port), "--http", http_impl]
        cmd += ["--loop", loop, "--flush", "default" if flush is None else str(flush)]
        if profile:
            cmd = [PY, "-m", "pyinstrument", "-r", "speedscope", "-o", profile, *cmd[1:]]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, text=True
        )
        self._ps: Any = None

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.kind} died: {self.proc.stderr.read()}")
            try:
                http(self.port, "GET", "/bench/subscribers", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server {self.kind} did not start") from None
                time.sleep(0.05)
        import psutil

        self._ps = psutil.Process(self.proc.pid)
        if self._ps.children():  # pyinstrument runs the server in-process; nothing to do
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cpu(self) -> float:
        """CPU seconds (user + system) used by the server process so far."""
        times = self._ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self._ps.memory_info().rss)

    def subscribers(self) -> int:
        return int(http(self.port, "GET", "/bench/subscribers")["subscribers"])

    def wait_subscribers(self, count: int, baseline: int = 0, timeout: float = 60) -> None:
        """Wait until `count` streams more than `baseline` are subscribed.

        aiohttp-sse notices a client that went away only at its next write (a
        ping, 15 s later), so streams of an earlier step may still count.
        """
        count += baseline
        deadline = time.monotonic() + timeout
        while self.subscribers() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind}: {self.subscribers()} of {count} subscribed")
            time.sleep(0.05)

    def publish(
        self, rooms: Sequence[str], n: int, size: int = 100, rate: float = 0, every: int = 100
    ) -> Any:
        query = f"rooms={','.join(rooms)}&n={n}&size={size}&rate={rate}&every={every}"
        return http(self.port, "POST", f"/bench/publish?{query}", timeout=600)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


# -- raw-socket SSE clients -----------------------------------------------------------


class Clients:
    """SSE client processes holding `conns` connections spread over `procs` processes."""

    def __init__(
        self,
        port: int,
        paths: Sequence[str],
        *,
        expect: int,
        procs: int = 2,
        latency: bool = False,
        steps: bool = False,
    ) -> None:
        procs = max(1, min(procs, len(paths)))
        self.procs: list[subprocess.Popen[str]] = []
        for i in range(procs):
            spec = {
                "port": port,
                "paths": list(paths[i::procs]),
                "expect": expect,
                "latency": latency,
                "steps": steps,
            }
            self.procs.append(
                subprocess.Popen(
                    [PY, __file__, "--client", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )
            )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            assert proc.stdout is not None
            line = ""
            while not line.startswith("READY"):
                if time.monotonic() > deadline or proc.poll() is not None:
                    self.kill()
                    raise RuntimeError(f"clients not ready: {line!r}")
                line = proc.stdout.readline()
                if line.startswith("FAIL"):
                    self.kill()
                    raise RuntimeError(f"client failed: {line}")

    def go(self, timeout: float, expect: int = 0, since: float = 0.0) -> None:
        """Tell the clients to stop waiting `timeout` seconds from now (in step
        mode: to measure a window of `expect` events published since `since`)."""
        line = f"GO {time.time() + timeout} {expect} {since}\n"
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line)
            proc.stdin.flush()

    def step_results(self) -> dict[str, Any]:
        """The window started by ``go(timeout, expect, since)`` (step mode), once
        every connection holds `expect` events published at or after `since` or
        the timeout passed: merged counts and latency histogram (0.1 ms buckets)."""
        merged: dict[str, Any] = {"conns": 0, "open": 0, "done": 0, "events": 0, "cpu": 0.0}
        hist: dict[int, int] = {}
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"client process {proc.pid} exited (code {proc.poll()})")
            data = json.loads(line)
            for key in merged:
                merged[key] += data[key]
            for bucket, count in data["hist"]:
                hist[bucket] = hist.get(bucket, 0) + count
        merged["hist"] = hist
        return merged

    def close(self) -> None:
        """End step mode: the client processes close their connections and exit."""
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cpu(self) -> float:
        import psutil

        total = 0.0
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(proc.pid).cpu_times()
                total += times.user + times.system
        return total

    def results(self) -> dict[str, Any]:
        merged: dict[str, Any] = {
            "conns": 0,
            "done": 0,
            "events": 0,
            "first": None,
            "last": None,
            "cpu": 0.0,
        }
        lats: list[float] = []
        for proc in self.procs:
            out, _ = proc.communicate(timeout=600)
            data = json.loads(out.strip().splitlines()[-1])
            merged["conns"] += data["conns"]
            merged["done"] += data["done"]
            merged["events"] += data["events"]
            merged["cpu"] += data["cpu"]
            for key, pick in (("first", min), ("last", max)):
                if data[key] is not None:
                    merged[key] = data[key] if merged[key] is None else pick(merged[key], data[key])
            lats.extend(data["lat"])
        merged["lat"] = lats
        return merged

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _client_main(spec: dict[str, Any]) -> None:
    raise_nofile()
    port = spec["port"]
    expect = int(spec["expect"])
    latency = bool(spec["latency"])
    steps = bool(spec.get("steps"))
    since = 0.0  # step mode: events published earlier are not counted
    hist: dict[int, int] = {}  # step mode: latency in 0.1 ms buckets -> deliveries
    closed = 0
    sel = selectors.DefaultSelector()
    # per connection: [headers_done, count, tail, done_time]
    state: dict[socket.socket, list[Any]] = {}
    lat: list[float] = []
    ready = 0
    done = 0
    total = 0
    first: float | None = None
    last: float | None = None
    deadline: float | None = None
    stdin_fd = sys.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    sel.register(stdin_fd, selectors.EVENT_READ, None)
    pending = list(spec["paths"])
    stdin_buf = b""
    cpu_go = _cpu()

    def connect_batch(n: int) -> None:
        for path in pending[:n]:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n".encode()
            )
            sock.setblocking(False)
            state[sock] = [False, 0, b"", None]
            sel.register(sock, selectors.EVENT_READ, None)
        del pending[:n]

    connect_batch(250)
    announced = False
    finished = False
    while not finished:
        if not announced and ready == len(state):
            if pending:
                connect_batch(250)
            else:
                print("READY", flush=True)
                announced = True
        if deadline is not None and (time.time() > deadline or (expect and done == len(state))):
            if not steps:
                break
            report = {"conns": len(state), "open": len(state) - closed, "done": done}
            report.update(events=total, hist=sorted(hist.items()), cpu=_cpu() - cpu_go)
            print(json.dumps(report), flush=True)
            deadline, done, total = None, 0, 0
            hist.clear()
            for st in state.values():
                st[1] = 0
            continue
        timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.time()))
        for key, _ in sel.select(timeout):
            if key.fd == stdin_fd:
                chunk = os.read(stdin_fd, 4096)
                if not chunk:
                    if steps:  # Clients.close(): the run is over
                        finished = True
                        break
                    deadline = deadline or time.time()
                    continue
                stdin_buf += chunk
                if b"\n" in stdin_buf:
                    line, stdin_buf = stdin_buf.split(b"\n", 1)
                    if line.startswith(b"GO"):
                        words = line.split()
                        deadline = float(words[1])
                        if steps:
                            expect, since = int(words[2]), float(words[3])
                        cpu_go = _cpu()
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            now = time.time()
            st = state[sock]
            if not data:
                sel.unregister(sock)
                if not st[0]:
                    print(f"FAIL connection closed before headers (port {port})", flush=True)
                    sys.exit(1)
                closed += 1
                continue
            buf = st[2] + data
            if not st[0]:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    st[2] = buf
                    continue
                status = buf[: buf.find(b"\r\n")]
                if b" 200" not in status:
                    print(f"FAIL {status!r}", flush=True)
                    sys.exit(1)
                st[0] = True
                ready += 1
                buf = buf[end + 4 :]
            # Keep an incomplete marker (and, in latency mode, its stamp) for the next read.
            cut = buf.rfind(MARKER)
            if cut >= 0 and buf.find(b";", cut) < 0:
                head, st[2] = buf[:cut], buf[cut:]
            elif buf.endswith(b"@"):
                head, st[2] = buf[:-1], b"@"
            else:
                head, st[2] = buf, b""
            if latency and steps:
                n = 0
                for s in _STAMP.findall(head):
                    published = float(s)
                    if published >= since:
                        n += 1
                        bucket = int((now - published) * 10000)
                        hist[bucket] = hist.get(bucket, 0) + 1
            elif latency:
                stamps = _STAMP.findall(head)
                n = len(stamps)
                lat.extend(now - float(s) for s in stamps)
            else:
                n = head.count(MARKER)
            if n:
                if first is None:
                    first = now
                before = st[1]
                st[1] += n
                total += n
                if expect and before < expect <= st[1]:
                    st[3] = now
                    done += 1
                    last = now if last is None else max(last, now)
    for sock in state:
        sock.close()
    if steps:  # every window was reported by its step
        return
    print(
        json.dumps(
            {
                "conns": len(state),
                "done": done,
                "events": total,
                "first": first,
                "last": last,
                "lat": [round(x, 5) for x in lat],
                "cpu": _cpu() - cpu_go,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        _client_main(json.loads(sys.argv[2]))
