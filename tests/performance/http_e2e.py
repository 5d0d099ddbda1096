"""HTTP end to end: C concurrent SSE clients against one server process.

    python tests/performance/http_e2e.py [--quick | --smoke] [--runs 3] [--json FILE]
        [--only-configs NAME,NAME] [--profile]

Each server runs in a subprocess on a free 127.0.0.1 port (tests/performance/
_servers.py); the clients are raw non-blocking sockets in 2-4 client processes
that only count the ``@@`` marker each event carries (see _common.py), so they
cost far less than the server. The server's CPU (user + system, psutil) over
the measured window is reported next to the clients' so that the table shows
the server is the bottleneck (about 100 % of one core).

Modes:

- burst: every client connected and subscribed, the server publishes E events
  of 100 bytes into the room as fast as it can (yielding every 100 events);
  timed from the publish request until the last client holds all E events;
  reported as deliveries/s = C * E / time.
- paced: 100 events/s for --paced-seconds; each event's data carries its
  publish time (``time.time()``); p50 / p99 of receive time minus publish
  time over every delivery.

Stacks: our Starlette adapter on uvicorn (flush_window as shipped, 0, 1 ms, 5 ms),
sse-starlette + encode/broadcaster on uvicorn, a bare ASGI app on the same
uvicorn (the ceiling: pre-encoded bytes, one send per wake-up), each on plain
uvicorn (h11, asyncio loop) and on ``uvicorn[standard]`` (httptools + uvloop);
our aiohttp adapter (flush as shipped, 0, 1 ms, 5 ms) and aiohttp-sse + encode/broadcaster on
aiohttp. Runs alternate the order of the stacks; figures are medians of
--runs runs and ratios are medians of the per-run ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    Clients,
    Server,
    available,
    fmt,
    median,
    progress,
    quantile,
    save_results,
    stamp,
    table,
    write_json,
    write_text,
)

# name -> (kind, http, loop, flush, group); flush None: the adapters' shipped default
CONFIGS: dict[str, tuple[str, str, str, float | None, str]] = {
    "ours-default": ("ours", "h11", "asyncio", None, "uvicorn-h11"),
    "ours": ("ours", "h11", "asyncio", 0.0, "uvicorn-h11"),
    "ours-1ms": ("ours", "h11", "asyncio", 0.001, "uvicorn-h11"),
    "ours-5ms": ("ours", "h11", "asyncio", 0.005, "uvicorn-h11"),
    "sse-starlette": ("sse-starlette", "h11", "asyncio", 0.0, "uvicorn-h11"),
    "bare": ("bare", "h11", "asyncio", 0.0, "uvicorn-h11"),
    "std/ours": ("ours", "httptools", "uvloop", 0.0, "uvicorn-standard"),
    "std/ours-1ms": ("ours", "httptools", "uvloop", 0.001, "uvicorn-standard"),
    "std/sse-starlette": ("sse-starlette", "httptools", "uvloop", 0.0, "uvicorn-standard"),
    "std/bare": ("bare", "httptools", "uvloop", 0.0, "uvicorn-standard"),
    "aiohttp/ours-default": ("ours-aiohttp", "h11", "asyncio", None, "aiohttp"),
    "aiohttp/ours": ("ours-aiohttp", "h11", "asyncio", 0.0, "aiohttp"),
    "aiohttp/ours-1ms": ("ours-aiohttp", "h11", "asyncio", 0.001, "aiohttp"),
    "aiohttp/ours-5ms": ("ours-aiohttp", "h11", "asyncio", 0.005, "aiohttp"),
    "aiohttp/aiohttp-sse": ("aiohttp-sse", "h11", "asyncio", 0.0, "aiohttp"),
}
# (ours, peer) pairs whose ratio is reported
PAIRS = [
    ("ours-default", "sse-starlette"),
    ("aiohttp/ours-default", "aiohttp/aiohttp-sse"),
    ("ours", "sse-starlette"),
    ("ours-1ms", "sse-starlette"),
    ("ours-5ms", "sse-starlette"),
    ("ours", "bare"),
    ("ours-1ms", "bare"),
    ("std/ours", "std/sse-starlette"),
    ("std/ours-1ms", "std/sse-starlette"),
    ("std/ours-1ms", "std/bare"),
    ("aiohttp/ours", "aiohttp/aiohttp-sse"),
    ("aiohttp/ours-1ms", "aiohttp/aiohttp-sse"),
    ("aiohttp/ours-5ms", "aiohttp/aiohttp-sse"),
]


def events_for(clients: int, scale: float) -> int:
    """Events per burst: about 100-200k deliveries, at most 1000 (the default queue bound)."""
    base = 1000 if clients <= 100 else 200
    return max(10, int(base * scale))


def measure_burst(
    server: Server, clients: int, events: int, tag: str, every: int = 1
) -> dict[str, Any]:
    room = f"burst{every}-{clients}-{tag}"
    procs = 2 if clients <= 100 else 3
    baseline = server.subscribers()
    group = Clients(server.port, [f"/events/{room}"] * clients, expect=events, procs=procs)
    try:
        group.wait_ready()
        server.wait_subscribers(clients, baseline)
        group.go(timeout=60)
        cpu0 = server.cpu()
        t0 = time.time()
        server.publish([room], events, every=every)
        out = group.results()
        cpu1 = server.cpu()
    finally:
        group.kill()
    end = out["last"] or time.time()
    elapsed = max(end - t0, 1e-6)
    return {
        "elapsed_s": elapsed,
        "deliveries_per_s": out["events"] / elapsed,
        "complete": out["done"] == clients,
        "server_cpu": (cpu1 - cpu0) / elapsed,
        "clients_cpu": out["cpu"] / elapsed,
    }


def measure_paced(
    server: Server, clients: int, seconds: float, rate: float, tag: str
) -> dict[str, Any]:
    room = f"paced-{clients}-{tag}"
    n = max(1, int(seconds * rate))
    procs = 2 if clients <= 100 else 3
    baseline = server.subscribers()
    group = Clients(server.port, [f"/events/{room}"] * clients, expect=n, procs=procs, latency=True)
    try:
        group.wait_ready()
        server.wait_subscribers(clients, baseline)
        group.go(timeout=seconds + 15)
        cpu0 = server.cpu()
        t0 = time.time()
        server.publish([room], n, rate=rate)
        cpu1 = server.cpu()
        t1 = time.time()
        out = group.results()
    finally:
        group.kill()
    lat = out["lat"]
    return {
        "p50_ms": quantile(lat, 0.5) * 1000,
        "p99_ms": quantile(lat, 0.99) * 1000,
        "max_ms": (max(lat) if lat else float("nan")) * 1000,
        "received": len(lat) / max(1, clients * n),
        "server_cpu": (cpu1 - cpu0) / max(t1 - t0, 1e-6),
        "clients_cpu": out["cpu"] / max(t1 - t0, 1e-6),
    }


def wait_idle(server: Server) -> None:
    """Let the server notice the clients that left (aiohttp-sse only does at its next ping)."""
    deadline = time.monotonic() + (1 if server.kind == "aiohttp-sse" else 15)
    while time.monotonic() < deadline:
        try:
            if not server.subscribers():
                return
        except OSError:  # still busy with a backlog (a timeout): ask again
            pass
        time.sleep(0.05)


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [n for n in CONFIGS if not args.only_configs or n in args.only_configs.split(",")]
    missing = [n for n in names if not _available(n)]
    names = [n for n in names if n not in missing]
    burst_cs = [int(c) for c in args.burst_clients.split(",")]
    paced_cs = [int(c) for c in args.paced_clients.split(",")]
    paced_names = [n for n in names if not n.startswith("std/") or args.paced_std]
    samples: dict[str, Any] = {n: {"burst": {}, "burst100": {}, "paced": {}} for n in names}
    modes = {"burst": 1, "burst100": 100} if args.burst100 else {"burst": 1}
    steps = args.runs * (len(names) * len(burst_cs) * len(modes) + len(paced_names) * len(paced_cs))
    with progress(steps, "http_e2e", not args.no_progress) as bar:
        for r in range(args.runs):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                kind, http_impl, loop, flush, _ = CONFIGS[name]
                with Server(kind, http_impl=http_impl, loop=loop, flush=flush) as server:
                    for mode, every in modes.items():
                        for c in burst_cs:
                            bar.set_postfix_str(f"{name} {mode} C={c}")
                            events = events_for(c, args.scale)
                            res = measure_burst(server, c, events, f"{r}", every)
                            samples[name][mode].setdefault(str(c), []).append(res)
                            wait_idle(server)
                            bar.update()
                    if name in paced_names:
                        for c in paced_cs:
                            bar.set_postfix_str(f"{name} paced C={c}")
                            res = measure_paced(server, c, args.paced_seconds, 100.0, f"{r}")
                            samples[name]["paced"].setdefault(str(c), []).append(res)
                            wait_idle(server)
                            bar.update()
    result = summarise(samples, names, burst_cs, paced_cs, paced_names)
    result["missing"] = missing
    return result


def _available(name: str) -> bool:
    kind, http_impl, *_ = CONFIGS[name]
    return available(kind, *(["httptools"] if http_impl == "httptools" else []))


def summarise(
    samples: dict[str, Any],
    names: list[str],
    burst_cs: list[int],
    paced_cs: list[int],
    paced_names: list[str],
) -> dict[str, Any]:
    burst: dict[str, Any] = {}
    burst100: dict[str, Any] = {}
    paced: dict[str, Any] = {}
    for name in names:
        burst[name] = {}
        burst100[name] = {}
        for (mode, into), c in (
            (m, c) for m in (("burst", burst), ("burst100", burst100)) for c in burst_cs
        ):
            runs = samples[name][mode].get(str(c), [])
            if not runs:
                continue
            into[name][str(c)] = {
                "deliveries_per_s": median([s["deliveries_per_s"] for s in runs]),
                "server_cpu": median([s["server_cpu"] for s in runs]),
                "clients_cpu": median([s["clients_cpu"] for s in runs]),
                "complete": all(s["complete"] for s in runs),
                "runs": [s["deliveries_per_s"] for s in runs],
            }
        if name in paced_names:
            paced[name] = {}
            for c in paced_cs:
                runs = samples[name]["paced"].get(str(c), [])
                paced[name][str(c)] = {
                    key: median([s[key] for s in runs])
                    for key in (
                        "p50_ms",
                        "p99_ms",
                        "max_ms",
                        "received",
                        "server_cpu",
                        "clients_cpu",
                    )
                }
                paced[name][str(c)]["runs_p99"] = [s["p99_ms"] for s in runs]
    burst100 = {k: v for k, v in burst100.items() if v}
    return {
        "burst": burst,
        "burst100": burst100,
        "paced": paced,
        "ratios": _ratios(burst, burst_cs),
        "ratios_burst100": _ratios(burst100, burst_cs),
        "samples": samples,
    }


def _ratios(burst: dict[str, Any], burst_cs: list[int]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    for ours, peer in PAIRS:
        if ours in burst and peer in burst:
            for c in burst_cs:
                a = burst[ours][str(c)]["runs"]
                b = burst[peer][str(c)]["runs"]
                paired = [x / y for x, y in zip(a, b, strict=False) if y]
                ratios[f"{ours} / {peer} @ C={c}"] = median(paired)
    return ratios


def markdown(result: dict[str, Any]) -> str:
    out = []
    for key, title, rkey in (
        ("burst", "Burst, one publish per loop iteration", "ratios"),
        ("burst100", "Burst, 100 publishes per loop iteration", "ratios_burst100"),
    ):
        burst = result.get(key) or {}
        if not burst:
            continue
        cs = list(next(iter(burst.values())).keys())
        out.append(
            f"**{title}** (deliveries/s, median; in brackets the CPU of the server process /"
            " of all client processes, in % of one core, over the measured window)\n"
        )
        rows = []
        for name, per_c in burst.items():
            cells = [
                f"{fmt(v['deliveries_per_s'])} ({v['server_cpu'] * 100:.0f} / "
                f"{v['clients_cpu'] * 100:.0f} %)" + ("" if v["complete"] else " incomplete")
                for v in per_c.values()
            ]
            rows.append([name, *cells])
        out.append(table(["stack", *[f"C={c}" for c in cs]], rows))
        out.append(f"\n**Ratios, {title.lower()}** (median of per-run ratios)\n")
        out.append(table(["pair", "ratio"], [[k, f"{v:.2f}x"] for k, v in result[rkey].items()]))
    paced = result["paced"]
    if paced:
        pcs = list(next(iter(paced.values())).keys())
        out.append(
            "\n**Paced** 100 events/s: p50 / p99 publish-to-receive in ms (share received)\n"
        )
        rows = []
        for name, per_c in paced.items():
            cells = [
                f"{v['p50_ms']:.1f} / {v['p99_ms']:.1f}"
                + ("" if v["received"] >= 0.999 else f" ({v['received'] * 100:.0f} %)")
                for v in per_c.values()
            ]
            rows.append([name, *cells])
        out.append(table(["stack", *[f"C={c}" for c in pcs]], rows))
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(result["burst"])
    colors = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}

    def style(name: str) -> dict[str, Any]:
        dash = "--" if name.startswith("std/") else ":" if name.startswith("aiohttp/") else "-"
        return {"color": colors.get(name), "linestyle": dash, "marker": "o", "label": name}

    for name, per_c in result["burst"].items():
        cs = [int(c) for c in per_c]
        axes[0].plot(cs, [v["deliveries_per_s"] for v in per_c.values()], **style(name))
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("concurrent SSE clients")
    axes[0].set_ylabel("deliveries/s (burst)")
    axes[0].set_title("Burst fan-out over HTTP (one publish per loop iteration)")
    axes[0].legend(fontsize=7)
    for name, per_c in result["paced"].items():
        cs = [int(c) for c in per_c]
        axes[1].plot(cs, [v["p99_ms"] for v in per_c.values()], **style(name))
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("concurrent SSE clients")
    axes[1].set_ylabel("p99 publish-to-receive (ms), 100 events/s")
    axes[1].set_title("Paced latency")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def profile(clients: int = 100, bursts: int = 3, paced_seconds: float = 3.0) -> dict[str, Any]:
    """Sample the server with py-spy while it serves bursts and a paced run.

    Writes the collapsed stacks to results/profile-NAME.txt and returns, per
    stack, the functions with the most samples on top of the stack (self) and
    anywhere on it (inclusive), in % of the samples taken.
    """
    import subprocess

    spy_exe = Path(sys.executable).parent / "py-spy"
    reports: dict[str, Any] = {}
    for name in ("ours", "ours-1ms", "sse-starlette", "bare", "aiohttp/ours"):
        if name not in CONFIGS or not _available(name) or not spy_exe.exists():
            continue
        kind, http_impl, loop, flush, _ = CONFIGS[name]
        out = RESULTS / f"profile-{name.replace('/', '_')}.txt"
        with Server(kind, http_impl=http_impl, loop=loop, flush=flush) as server:
            spy = subprocess.Popen(
                [
                    str(spy_exe),
                    "record",
                    "--pid",
                    str(server.proc.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--output",
                    str(out),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
            for i in range(bursts):
                measure_burst(server, clients, 1000, f"p{i}")
                wait_idle(server)
            measure_paced(server, clients * 5, paced_seconds, 100.0, "p")
            wait_idle(server)
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(30)
        if out.exists():
            reports[name] = summarise_profile(out)
    return reports


def summarise_profile(path: Path, top: int = 12, *, busy_only: bool = False) -> dict[str, Any]:
    """Self and inclusive shares of py-spy's raw stacks; `busy_only` leaves out
    the samples of a loop waiting in ``select`` (an idle server)."""
    self_count: dict[str, int] = {}
    incl_count: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if busy_only and "select (selectors.py" in stack.rsplit(";", 1)[-1]:
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        self_count[frames[-1]] = self_count.get(frames[-1], 0) + n
        for frame in set(frames):
            incl_count[frame] = incl_count.get(frame, 0) + n

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(k, 100 * v / max(total, 1)) for k, v in best]

    return {"samples": total, "self": ranked(self_count), "inclusive": ranked(incl_count)}


def _frame(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({module})" if module else name


def profile_markdown(reports: dict[str, Any]) -> str:
    out = []
    for name, rep in reports.items():
        out.append(f"**{name}** ({rep['samples']} samples; self % / inclusive %)\n")
        rows = []
        for (f1, p1), (f2, p2) in zip(rep["self"], rep["inclusive"], strict=False):
            rows.append([f1, f"{p1:.1f}", f2, f"{p2:.1f}"])
        out.append(table(["self", "%", "inclusive", "%"], rows))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer clients and events")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--burst-clients", default="10,100,1000")
    parser.add_argument("--paced-clients", default="10,100,500,1000")
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument("--paced-std", action="store_true", help="paced runs on httptools too")
    parser.add_argument(
        "--no-burst100", dest="burst100", action="store_false", help="skip the batched burst"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="scale the burst sizes")
    parser.add_argument("--only-configs", default="")
    parser.add_argument("--profile", action="store_true", help="also profile with py-spy")
    parser.add_argument("--profile-only", action="store_true", help="only the py-spy profiles")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.profile_only:
        reports = profile()
        write_json("profile", reports)
        text = profile_markdown(reports)
        write_text("profile.md", text)
        print(text)
        return
    if args.smoke:
        args.runs, args.burst_clients, args.paced_clients = 1, "5", "5"
        args.paced_seconds, args.scale, args.burst100 = 0.3, 0.05, False
        args.only_configs = args.only_configs or "ours,sse-starlette,bare,aiohttp/ours"
        args.no_progress = True
    elif args.quick:
        args.runs = min(args.runs, 1)
        args.burst_clients, args.paced_clients = "10,100", "100"
        args.paced_seconds, args.scale = 1.0, 0.3
    result = run(args)
    stamp(result, "http_e2e.py")
    md = markdown(result)
    if args.profile:
        result["profiles"] = profile()
        write_text("profile.md", profile_markdown(result["profiles"]))
    save_results("http_e2e", result, md, smoke=args.smoke, json_path=args.json)
    if not args.smoke:
        plot(result, RESULTS / "perf-http-e2e.png")


if __name__ == "__main__":
    main()
