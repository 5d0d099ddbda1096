"""Run the benchmarks and regenerate the results section of docs/performance.md.

    python tests/performance/run.py [--quick | --full | --smoke] [--only NAME[,NAME]]
        [--render-only] [--no-docs]

Benchmarks (each a script of its own, run here as a subprocess):

- ``fanout``: tests/performance/bench_fanout.py, in-process fan-out;
- ``seed_scenarios``: the reference document's four scenarios, in-process and over HTTP;
- ``http_e2e``: C concurrent SSE clients over HTTP, burst and paced, with the ceiling;
- ``sustained_fanout``: the highest publish rate 1,000 SSE clients receive with p99 <= 50 ms;
- ``responses``: a request's own generator, ours vs sse-starlette, and one
  multi-session stream vs 10 streams per client;
- ``connections``: 10,000 idle SSE connections to one server process;
- ``memory_soak``: tests/performance/benchmark_sse_memory.py;
- ``load_test``: locust (tests/load_test/load_test.py) against ``python -m sse_broadcaster.demo``.

``--full`` (the default) is what docs/performance.md quotes: 3 runs each and a
10-minute soak. ``--quick`` takes a few minutes (1 run, fewer clients, 60 s
soak) and ``--smoke`` a few seconds per benchmark (what the test suite runs;
it never touches the docs). Results go to tests/performance/results/
(git-ignored): NAME.json, NAME.md and PNG plots; the JSON and table of each
benchmark run (not in smoke mode) are also copied to tests/performance/kept/,
in the repository, so that a later run of other benchmarks renders this
one's section from them, on any machine. Unless ``--no-docs`` or
``--smoke``, the text between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in docs/performance.md is replaced with the tables,
the plots (copied to docs/img/perf-*.png), the command, the machine and the
date; the rest of the page is left alone. ``--render-only`` rewrites that
section from the JSON already in the results folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    HERE,
    RESULTS,
    ROOT,
    available,
    free_port,
    machine,
    table,
    write_json,
    write_text,
)

NAMES = [
    "fanout",
    "seed_scenarios",
    "http_e2e",
    "sustained_fanout",
    "responses",
    "connections",
    "memory_soak",
    "load_test",
]
DOCS = ROOT / "docs" / "performance.md"
IMG = ROOT / "docs" / "img"
# The JSON and tables each section of the docs was last rendered from, kept in
# the repository: a run of some benchmarks re-renders the others from here.
KEPT = HERE / "kept"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
LOAD_RESULTS = ROOT / "tests" / "load_test" / ".results"


def command(name: str, mode: str) -> list[str]:
    py = sys.executable
    smoke = mode == "smoke"
    quick = mode == "quick"
    if name == "fanout":
        cmd = [py, str(HERE / "bench_fanout.py"), "--json", str(RESULTS / _json_name(name, mode))]
        if smoke:
            return [*cmd, "--quick", "--runs", "1", "--idle", "1000"]
        return [*cmd, "--quick", "--runs", "1"] if quick else [*cmd, "--runs", "3"]
    script = {
        "seed_scenarios": "seed_scenarios.py",
        "http_e2e": "http_e2e.py",
        "sustained_fanout": "sustained_fanout.py",
        "responses": "bench_responses.py",
        "connections": "connections.py",
        "memory_soak": "benchmark_sse_memory.py",
    }[name]
    flag = {"smoke": ["--smoke"], "quick": ["--quick"]}.get(mode, [])
    if name == "memory_soak" and mode == "full":
        flag = ["--full"]
    elif mode == "full":
        flag = ["--runs", "3"]
    return [py, str(HERE / script), *flag]


def _json_name(name: str, mode: str) -> str:
    return f"{name}-smoke.json" if mode == "smoke" else f"{name}.json"


def run_script(name: str, mode: str) -> None:
    cmd = command(name, mode)
    print(f"--- {name}: {' '.join(Path(c).name if '/' in c else c for c in cmd)}", flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=7200)
    out = proc.stdout
    if name == "fanout":
        write_text("fanout.txt" if mode != "smoke" else "fanout-smoke.txt", out)
        md = "\n".join(line for line in out.splitlines() if line.startswith("|")) + "\n"
        write_text("fanout.md" if mode != "smoke" else "fanout-smoke.md", md)
    print(out, flush=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    print(f"--- {name}: {time.monotonic() - started:.0f} s", flush=True)


# -- the load test -------------------------------------------------------------------


def load_test(mode: str) -> None:
    users, rate, seconds = {"smoke": (10, 10, 3), "quick": (200, 20, 15)}.get(mode, (200, 20, 30))
    port = free_port()
    host = f"http://127.0.0.1:{port}"
    LOAD_RESULTS.mkdir(parents=True, exist_ok=True)
    prefix = LOAD_RESULTS / ("smoke" if mode == "smoke" else "results")
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sse_broadcaster.demo",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_http(port)
        locust_cmd = [
            "locust",
            "-f",
            "tests/load_test/load_test.py",
            "-H",
            host,
            "--headless",
            "-t",
            f"{seconds}s",
            "-u",
            str(users),
            "-r",
            str(rate),
            f"--csv={prefix.relative_to(ROOT)}",
            f"--html={prefix.relative_to(ROOT)}-report.html",
            "--only-summary",
        ]
        if available("locust"):
            import psutil

            ps = psutil.Process(demo.pid)
            cpu0 = sum(ps.cpu_times()[:2])
            t0 = time.monotonic()
            exe = str(Path(sys.executable).parent / "locust")
            proc = subprocess.run(
                [exe, *locust_cmd[1:]],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=seconds + 120,
            )
            server_cpu = (sum(ps.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
            if proc.returncode not in (0, 1):  # 1: some requests failed; reported below
                raise SystemExit(f"locust failed: {proc.stderr[-2000:]}")
            rows = _read_locust(Path(f"{prefix}_stats.csv"))
            result: dict[str, Any] = {"tool": "locust", "rows": rows, "server_cpu": server_cpu}
        else:
            result = {"tool": "httpx (locust is not installed)", "rows": _without_locust(port)}
            result["server_cpu"] = float("nan")
    finally:
        demo.send_signal(signal.SIGTERM)
        try:
            demo.wait(15)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
    result.update(users=users, spawn_rate=rate, seconds=seconds)
    result["command"] = " ".join(locust_cmd).replace(host, "http://127.0.0.1:8000")
    result["machine"] = machine()
    md = _load_markdown(result)
    print(md)
    name = "load_test-smoke" if mode == "smoke" else "load_test"
    write_json(name, result)
    write_text(f"{name}.md", md)


def _wait_http(port: int) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _read_locust(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            rows.append(
                {
                    "type": row["Type"],
                    "name": row["Name"],
                    "requests": int(row["Request Count"]),
                    "failures": int(row["Failure Count"]),
                    "median_ms": float(row["50%"] or "nan"),
                    "p95_ms": float(row["95%"] or "nan"),
                    "p99_ms": float(row["99%"] or "nan"),
                    "rps": float(row["Requests/s"]),
                }
            )
    return rows


def _without_locust(port: int) -> list[dict[str, Any]]:
    """The load test's two requests made once each with httpx (locust missing)."""
    import httpx

    rows = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        t0 = time.perf_counter()
        r = client.post("/publish/load-0", json={"data": {"sent": time.time()}, "event": "load"})
        rows.append(_row("POST", "POST /publish/[room]", r.status_code, t0))
        t0 = time.perf_counter()
        with client.stream("GET", "/events/load-0") as r:
            rows.append(_row("GET", "GET /events/[room]", r.status_code, t0))
    return rows


def _row(kind: str, name: str, status: int, t0: float) -> dict[str, Any]:
    ms = (time.perf_counter() - t0) * 1000
    return {
        "type": kind,
        "name": name,
        "requests": 1,
        "failures": int(status != 200),
        "median_ms": ms,
        "p95_ms": ms,
        "p99_ms": ms,
        "rps": float("nan"),
    }


def _load_markdown(result: dict[str, Any]) -> str:
    rows = [
        [
            r["name"],
            r["requests"],
            r["failures"],
            f"{r['median_ms']:.0f}",
            f"{r['p95_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
            f"{r['rps']:.1f}",
        ]
        for r in result["rows"]
    ]
    header = [
        f"{result['users']} users, {result['seconds']} s",
        "requests",
        "failures",
        "median (ms)",
        "p95 (ms)",
        "p99 (ms)",
        "per second",
    ]
    return table(header, rows)


# -- plots ---------------------------------------------------------------------------


def plot_fanout() -> None:
    path = RESULTS / "fanout.json"
    if not path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows = data["rows"]
    labels = [f"{r['subscribers']} x {r['events']}" for r in rows]
    impls = [i for i in ("ours", "encode", "queue") if i in rows[0]]
    names = {"ours": "ours", "encode": "encode/broadcaster", "queue": "asyncio.Queue"}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        xs = [i + k * width for i in range(len(rows))]
        ax.bar(xs, [r[impl]["deliveries_per_s"] / 1e6 for r in rows], width, label=names[impl])
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(rows))], labels)
    ax.set_xlabel("subscribers x events")
    ax.set_ylabel("million deliveries/s")
    ax.set_title("In-process fan-out")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "perf-fanout.png", dpi=90)
    plt.close(fig)


# -- docs ----------------------------------------------------------------------------


def _found(filename: str) -> Path | None:
    """A result file of this run (tests/performance/results) or, failing that, the
    one the docs were last rendered from (tests/performance/kept)."""
    for folder in (RESULTS, KEPT):
        if (folder / filename).exists():
            return Path(folder / filename)
    return None


def _load(name: str) -> dict[str, Any] | None:
    path = _found(f"{name}.json")
    return json.loads(path.read_text()) if path is not None else None


def keep(names: list[str]) -> None:
    """Copy this run's results of `names` (JSON and table) to tests/performance/kept."""
    KEPT.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in (".json", ".md"):
            src = RESULTS / f"{name}{suffix}"
            if src.exists():
                shutil.copy(src, KEPT / src.name)


def targets() -> list[list[str]]:
    """Every target of the performance issue with the measured figure."""
    rows: list[list[str]] = []

    def add(target: str, measured: str, ok: bool | None) -> None:
        rows.append([target, measured, "n/a" if ok is None else ("met" if ok else "**missed**")])

    fanout = _load("fanout")
    if fanout:
        # Issue #14, target 3: in process, history and bounds on.
        for row in fanout["rows"]:
            mode, subs = row["mode"], row["subscribers"]
            bounds = {"encode": 5.0, "queue": 2.0} if mode == "burst" else {"encode": 1.5}
            for peer, want in bounds.items():
                key = f"vs_{peer}"
                if key in row:
                    label = "encode/broadcaster" if peer == "encode" else "asyncio.Queue fan-out"
                    add(
                        f"in-process {mode} >= {want:g}x {label}, S={subs}",
                        f"{row[key]:.2f}x",
                        row[key] >= want,
                    )
    e2e = _load("http_e2e")
    if e2e:
        # Issue #14: the adapters as shipped against the peer on their own server.
        ratios = e2e["ratios"]
        pairs = (("ours-default", "sse-starlette"), ("aiohttp/ours-default", "aiohttp/aiohttp-sse"))
        wants = {
            ("sse-starlette", "100"): 8.0,
            ("aiohttp/aiohttp-sse", "100"): 5.0,
            ("sse-starlette", "1000"): 4.0,
            ("aiohttp/aiohttp-sse", "1000"): 4.0,
        }
        for ours, peer in pairs:
            for c in ("10", "100", "1000"):
                key = f"{ours} / {peer} @ C={c}"
                if key in ratios:
                    goal = wants.get((peer, c))
                    label = f"burst {ours} >= {goal:g}x {peer}" if goal else f"burst {key}"
                    add(
                        f"{label}, C={c}" if goal else label,
                        f"{ratios[key]:.2f}x",
                        None if goal is None else ratios[key] >= goal,
                    )
        paced = e2e["paced"]

        def runs(name: str, c: str) -> str:
            values = paced[name][c].get("runs_p99", [])
            return "/".join(f"{x:.1f}" for x in values)

        peers = [p for p in ("sse-starlette", "aiohttp/aiohttp-sse") if p in paced]
        for ours, _ in pairs:
            for c in paced.get(ours, {}):
                present = [p for p in peers if c in paced[p]]
                if not present:
                    continue
                mine = paced[ours][c]
                for q in ("p50", "p99"):
                    best = min(present, key=lambda p: paced[p][c][f"{q}_ms"])
                    b = paced[best][c][f"{q}_ms"]
                    v = mine[f"{q}_ms"]
                    extra = f" (runs {runs(ours, c)} vs {runs(best, c)})" if q == "p99" else ""
                    add(
                        f"paced {q} {ours} <= better peer, C={c}",
                        f"{v:.2f} ms vs {best} {b:.2f} ms{extra}",
                        v <= b,
                    )
    sustained = _load("sustained_fanout")
    if sustained:
        stacks = sustained["stacks"]
        for pair, ratio in sustained["ratios"].items():
            ours, peer = pair.split(" / ")
            add(
                f"sustained fan-out {pair}, C={sustained['clients']}"
                f" (p99 <= {sustained['p99_bound_ms']:g} ms)",
                ("n/a" if ratio != ratio else f"{ratio:.2f}x")  # NaN: no peer rate passed
                + f" ({stacks[ours]['rate']:g} vs {stacks[peer]['rate']:g} events/s)",
                None,
            )
    responses = _load("responses")
    if responses:
        gen = responses["generators"]
        for key, ratio in gen["ratios"].items():
            add(f"generator burst {key} >= 3x", f"{ratio:.2f}x", ratio >= 3)
        for c, v in gen["p99"].items():
            add(
                f"generator paced p99 ours <= sse-starlette, C={c}",
                f"{v['ours_ms']:.1f} vs {v['sse_starlette_ms']:.1f} ms",
                v["no_worse"],
            )
        multi = responses["multi"]
        for key, ratio in multi["ratios"].items():
            add(
                f"{multi['clients']} clients x {multi['sessions']} sessions, {key}",
                "n/a" if ratio != ratio else f"{ratio:.2f}x",
                None,
            )
    conns = _load("connections")
    if conns and "ours" in conns["stacks"]:
        r = conns["stacks"]["ours"]
        add(
            f"<= 30 KB per connection ({conns['connections']} idle streams)",
            f"{r['total_kb_per_conn']:.1f} KB server included, "
            f"{r['added_kb_per_conn']:.1f} KB added",
            r["total_kb_per_conn"] <= 30,
        )
    for name in ("memory_soak", "memory_soak-long"):
        soak = _load(name)
        if not soak or "ours" not in soak["impls"]:
            continue
        r = soak["impls"]["ours"]
        dur = f"{soak['duration_s'] / 60:.0f} min"
        g = r["growth_mb_per_hour"]
        after = [m for t, m in r["rss"] if t >= soak["warmup_s"]]
        rise = f"RSS {after[0]:.2f} -> {after[-1]:.2f} MB after warm-up" if after else ""
        others = [
            f"{label} {soak['impls'][impl]['growth_mb_per_hour']:+.2f}"
            for impl, label in (("encode", "encode/broadcaster"), ("harness", "the load alone"))
            if impl in soak["impls"]
        ]
        context = "; ".join([rise, *others])
        add(
            f"memory growth <= 0.5 MB/hour ({dur} soak)",
            f"{g:+.2f} MB/h ({context})" if context else f"{g:+.2f} MB/h",
            g <= 0.5,
        )
        add(f"peak RSS <= 60 MB ({dur} soak)", f"{r['peak_mb']:.1f} MB", r["peak_mb"] <= 60)
    load = _load("load_test")
    if load:
        agg = [r for r in load["rows"] if r["name"] == "Aggregated"]
        if agg:
            p95 = agg[0]["p95_ms"]
            add(f"load test p95 < 200 ms at {load['users']} users", f"{p95:.0f} ms", p95 < 200)
    return rows


FANOUT_TEXT = """
One session, S subscribers, E events of 100 bytes; deliveries/s until every
subscriber has every event (see above).
"""
SEED_TEXT = """
Timed: from the first publish until every subscriber has every event meant
for it. Sustained: 5 sessions x 500 events, one subscriber each, published
round-robin. Burst: one subscriber, 5 bursts of 200 events, each burst
published at once and the next one started when the subscriber has it. Many
sessions: 50 sessions x 20 events, one subscriber each. Concurrent: 10
subscribers on one session and 10 publishes issued in parallel (over HTTP: 10
parallel `POST /publish/{room}` on a warm httpx pool). Over HTTP the
subscribers are SSE streams read by the benchmark process, and the other
scenarios publish inside the server through one control request per burst.
The reference's own figures (its "after" column) are quoted for orientation
only: they come from another machine and another code base. Median of 3 runs;
speed-up = peer time / our time.
"""
E2E_TEXT = """
C concurrent SSE clients (raw non-blocking sockets in 2-3 client processes
that only count a marker per event) against one server process. **Burst**:
the server publishes E events of 100 bytes as fast as it can (E = 1000 for
C <= 100, 200 for C = 1000), timed from the publish request until the last
client holds all E events. In the first table (the one the targets use) the
publisher yields to the event loop after every publish, as when events arrive
one by one from the network: each wake-up finds one event to send unless the
flush window lets more join it. In the second it yields every 100 publishes,
so every stack finds up to 100 events queued per wake-up; stacks that write
one event per send (the peers) cannot use that (shown when the run includes
it). **Paced**: 100 events/s for `--paced-seconds` (10 s by default); p50/p99
of receive time minus the publish time carried in the event. `ours-default`
runs as shipped, `ours` with `flush_window=0`, `ours-1ms` with 1 ms (the
default) and `ours-5ms` with 5 ms: the window caps
how long a burst's write is held while events keep coming (one holder per
session, yielding once per loop iteration; two iterations with nothing new
end the hold, so a paced event is held microseconds, never a window); `bare` is a bare ASGI
app on the same uvicorn writing pre-encoded bytes (no broadcaster, no
framework): the ceiling. `std/` rows run `uvicorn[standard]` (httptools +
uvloop); the others plain uvicorn (h11, asyncio loop). The CPU figures in
brackets (server / all client processes, % of one core over the measured
window) show where the time goes. Median of 3 runs; ratios are medians of
per-run ratios.

Until the hold ended with the burst, the window was a timer: a paced event
less than five windows after the last write waited a whole window, which
cost the paced p50/p99 at small C (issue #14). Now the window only bounds a
burst that does not stop (or a large fan-out's time, see "Flush" above);
`flush_window=0` writes every wake-up at once and gives up the burst
throughput. A run names the stacks it measured (`--only-configs`).
"""
SUSTAINED_TEXT = """
C SSE clients (1,000) on one room, connected for the whole search, and one
server process per stack; each step publishes R events/s of 100 bytes for 5 s
from inside the server. A step passes when every client holds every event,
none was dropped, the publisher kept its schedule, and p99 publish-to-receive
(over every delivery) is <= 50 ms; a failing step is retried once on a fresh
server and fresh clients. R starts at 10/s, doubles while steps pass, then
bisects 3 times. Shown: the highest passing R, deliveries/s there (R x C), the
latency and the CPU (% of one core) there; when no rate passes, the latency at
the lowest rate tried (1/s). Ours (both adapters) runs with the
shipped defaults, the 1 ms flush window included; `bare` is the ceiling (see
above). The uvicorn stacks run on plain uvicorn (h11, asyncio) and, as `std/`,
on `uvicorn[standard]` (httptools, uvloop). Median of 3 runs; ratios are medians of per-run ratios.
"""
RESPONSES_TEXT = """
**Generators**: a FastAPI path operation returns an `EventSourceResponse` over
the request's own async generator, ours (`sse_broadcaster.starlette`) or
sse-starlette's, `ping=15` both, on uvicorn (h11, asyncio). Every generator of
a run starts at once; in burst it yields E strings of 100 bytes as fast as it
can (E = 1000 for C <= 100, 200 for C = 1000), paced it yields 100 events/s
stamped with the time of the yield. Measured as in the HTTP end-to-end section,
with the same clients. **Multi-session**: N clients each follow the same 10
sessions of our broadcaster, on one connection (`subscribe_many`, streamed by
a plain ASGI route writing each `receive_batch()`: multi-session responses
are not part of `EventSourceResponse` yet) or on 10 `sse_endpoint`
connections, while the 10 sessions get a paced publish; server RSS added and
server CPU, per client. Each layout runs on a fresh server.
"""
CONN_TEXT = """
N idle SSE streams on one session from 4 client processes, to one server
process (plain uvicorn, h11). "Added" is (RSS with the streams - RSS after a
warm-up) / N; "server included" is RSS / N (the figure comparable with
Centrifuge's ~30 KB per connection). "One event to all": from the publish
request until the last client has the event.
"""
SOAK_TEXT = """
Processes side by side under the same load for the whole run: 1,000 live
sessions (a sliding window of ids, 20 new a second), 2,000 events/s of ~200
bytes, 1,000 subscriber tasks that subscribe, read 0.2-3 s and leave, 5 % of
subscriptions that never read (held 30 s; a fifth of them abandoned without
closing). Ours runs with event_ttl 5 s, session_ttl 10 s, cleanup_interval
1 s, 50 events of history per session. A third process runs the same load
with a broadcaster that does nothing ("the load alone"): what the interpreter
and the load's own tasks and timers cost. RSS sampled every second; growth is
the least-squares slope after the warm-up (20 % of the run, at least 10 s);
the slope over the second half alone is shown for information.
"""
SOAK_LONG_TEXT = """
The same load for longer (an hour, on request: ``--duration 3600``). A
least-squares slope over ten minutes also measures the allocator settling
after the warm-up; over an hour that weighs six times less.
"""
PROFILE_TEXT = """
py-spy samples the server process (200 Hz) while it serves three bursts to
100 clients (one publish per loop iteration) and 3 s of paced events to 500
clients. "self" is the share of samples with that function on top of the
stack, "inclusive" anywhere on it. On every stack the socket write
(`_SelectorSocketTransport.write`, one `send()` system call per ASGI body
message) dominates; the broadcaster (`EventBroadcaster.deliver`) is a few
percent. Fewer, larger writes (the flush window) is what moves throughput.
"""
LOAD_TEXT = """
`python -m sse_broadcaster.demo` against locust on the same machine: three SSE
readers (streams of 5-15 s on 10 rooms) per publisher (`POST /publish/{room}`
every 0.1-0.5 s). `SSE event` rows are publish-to-receive times of the events
the readers got. See tests/load_test/README.md.
"""


def _display(cmd: list[str]) -> str:
    """A command as a user types it: ``python tests/performance/x.py ...``."""
    shown = ["python"]
    for part in cmd[1:]:
        path = Path(part)
        shown.append(str(path.relative_to(ROOT)) if path.is_absolute() else part)
    return " ".join(shown)


def render(cmdline: str) -> str:
    info = machine()
    parts = [BEGIN, "", "## Latest results", ""]
    parts.append(
        f"Last regenerated by `{cmdline}` on {info['date']}: {info['cores']} cores, "
        f"Python {info['python']}, {info['platform']}, load average at the end "
        f"{', '.join(f'{x:.2f}' for x in info['load_avg'])}. Sections not named "
        "in that command keep the figures of their own last run, shown with the "
        "command that produced them."
    )
    parts.append("")
    parts.append("Packages: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".")
    parts.append("")
    parts.append("### Targets\n")
    parts.append(table(["target", "measured (median)", "status"], targets()))
    sections = [
        ("fanout", "In-process fan-out", FANOUT_TEXT, ["perf-fanout.png"]),
        ("seed_scenarios", "The reference scenarios", SEED_TEXT, []),
        ("http_e2e", "HTTP end to end", E2E_TEXT, ["perf-http-e2e.png"]),
        ("sustained_fanout", "Sustained fan-out", SUSTAINED_TEXT, []),
        ("responses", "Responses: generators and multi-session streams", RESPONSES_TEXT, []),
        ("connections", "10,000 idle connections", CONN_TEXT, []),
        ("memory_soak", "Memory soak", SOAK_TEXT, ["perf-memory-soak.png"]),
        (
            "memory_soak-long",
            "Memory soak, longer run",
            SOAK_LONG_TEXT,
            ["perf-memory-soak-long.png"],
        ),
        ("load_test", "Load test (locust, demo server)", LOAD_TEXT, []),
        ("profile", "Where the server's time goes (py-spy)", PROFILE_TEXT, []),
    ]
    previous = _old_blocks(DOCS.read_text()) if DOCS.exists() else {}
    for name, title, text, images in sections:
        md = _found(f"{name}.md")
        if md is None:
            if title in previous:  # rendered before from results not on this machine
                parts.append(previous[title])
            continue
        data = _load(name) or {}
        parts.append(f"### {title}\n")
        if name == "profile":
            cmd = "python tests/performance/http_e2e.py --profile-only"
        else:
            cmd = data.get("command") or _display(command(name, "full"))
        parts.append(f"```bash\n{cmd}\n```\n")
        parts.append(text.strip() + "\n")
        parts.append(md.read_text())
        for image in images:
            src = RESULTS / image
            if src.exists():
                IMG.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, IMG / image)
            if (IMG / image).exists():
                parts.append(f"![{title}](img/{image})\n")
    parts.append(END)
    return "\n".join(parts) + "\n"


def _old_blocks(text: str) -> dict[str, str]:
    """The ``### title`` blocks of the results section now in the docs, by title."""
    if BEGIN not in text or END not in text:
        return {}
    section = text.split(BEGIN, 1)[1].split(END, 1)[0]
    blocks: dict[str, str] = {}
    for block in section.split("\n### ")[1:]:
        title, _, body = block.partition("\n")
        blocks[title.strip()] = f"### {title.strip()}\n{body.rstrip()}\n"
    return blocks


def update_docs(cmdline: str) -> None:
    text = DOCS.read_text()
    section = render(cmdline)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text)
    print(f"--- updated {DOCS.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a few minutes")
    group.add_argument("--full", action="store_true", help="the published figures (default)")
    group.add_argument("--smoke", action="store_true", help="seconds each; docs untouched")
    parser.add_argument("--only", default="", help=f"comma-separated, of: {', '.join(NAMES)}")
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs section")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/performance.md alone")
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    names = [n.strip() for n in args.only.split(",") if n.strip()] or NAMES
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark {unknown}; choose from {NAMES}")
    cmdline = " ".join(["python", "tests/performance/run.py", *sys.argv[1:]])
    if args.render_only:
        saved = RESULTS / "run.json"
        if saved.exists():
            cmdline = json.loads(saved.read_text()).get("command", cmdline)
    else:
        if mode != "smoke":
            write_json("run", {"command": cmdline, "only": names})
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name == "load_test":
                load_test(mode)
            elif name == "fanout" and not available("encode"):
                print(
                    "--- fanout: skipped, encode/broadcaster is not installed"
                    " (pip install -r requirements/bench.txt)"
                )
            else:
                run_script(name, mode)
        if mode != "smoke":
            plot_fanout()
            keep(names)
    if mode != "smoke" and not args.no_docs:
        update_docs(cmdline)


if __name__ == "__main__":
    main()
