"""Sustained fan-out: the highest publish rate that C clients receive with p99 <= 50 ms.

    python tests/performance/sustained_fanout.py [--quick | --smoke] [--runs 3]
        [--clients 1000] [--step-seconds 5] [--p99-ms 50] [--start-rate 10]
        [--max-rate 5000] [--bisect 3] [--confirm 1] [--only-stacks NAME,NAME]
        [--json FILE]

Per stack, one server process (tests/performance/_servers.py) and C SSE
clients on one room, kept connected from step to step (raw sockets in 2-3
client processes, _common.py in step mode). A step publishes R events/s of
100 bytes for --step-seconds from inside the server (each event carries its
publish time) and measures, over every delivery, p50 / p99 of receive time
minus publish time, and the server's CPU (user + system, psutil) over the
publishing window. A step passes when every client holds every event of the
step, no connection was dropped, the publisher ended no later than 5 % of the
step (+ 0.1 s) behind its schedule, and p99 <= --p99-ms. A failing step is
repeated --confirm times (a shared machine has hiccups) and fails when every
attempt does; after each failing attempt the stack restarts (fresh server,
fresh clients) so that a backlog cannot spill into the next step.

The search starts at --start-rate and doubles R while steps pass, then
bisects --bisect times between the last passing and the first failing rate.
Reported: the highest passing R, deliveries/s there (R x C), p50 / p99 there
and the server's CPU (% of one core). Stacks: our Starlette adapter on
uvicorn and our aiohttp adapter on aiohttp, both with the shipped defaults
(flush_window included); sse-starlette + encode/broadcaster on uvicorn;
aiohttp-sse + encode/broadcaster on aiohttp; and the bare ASGI app on the same
uvicorn (the ceiling). The uvicorn stacks run twice: on plain uvicorn (h11,
asyncio) and, as ``std/``, on ``uvicorn[standard]`` (httptools, uvloop): with
h11 no stack (the bare app included) writes one event to 1,000 connections
within 50 ms. Runs alternate the order of the stacks; figures are
medians of --runs runs and ratios medians of the per-run ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Clients,
    Server,
    available,
    fmt,
    hist_quantile,
    median,
    progress,
    save_results,
    stamp,
    table,
)

# name -> server kind (_servers.py); all on h11 / the asyncio loop
STACKS: dict[str, str] = {
    "ours": "ours",
    "sse-starlette": "sse-starlette",
    "bare": "bare",
    "std/ours": "ours",
    "std/sse-starlette": "sse-starlette",
    "std/bare": "bare",
    "aiohttp/ours": "ours-aiohttp",
    "aiohttp/aiohttp-sse": "aiohttp-sse",
}
# (ours, peer) pairs whose ratio of highest passing rates is reported
PAIRS = [
    ("ours", "sse-starlette"),
    ("std/ours", "std/sse-starlette"),
    ("aiohttp/ours", "aiohttp/aiohttp-sse"),
    ("ours", "bare"),
    ("std/ours", "std/bare"),
]
ROOM = "sustained"
# The clients' window outlives the publishing by this much: an event later
# than that is missing, and the step fails anyway.
GRACE_S = 3.0
# A step fails when the publisher ends later than its schedule by more than
# this share of the step (plus LAG_S for the publish request itself).
MAX_LAG_SHARE = 0.05
LAG_S = 0.1


class Stack:
    """A server and C step-mode clients subscribed to one room."""

    def __init__(self, name: str, clients: int) -> None:
        self.name = name
        self.kind = STACKS[name]
        self.clients = clients
        self.server: Server | None = None
        self.group: Clients | None = None
        self.starts = 0

    def start(self) -> None:
        # flush=None: our adapters run with their shipped flush_window.
        # std/: uvicorn[standard] (httptools + uvloop); the others plain uvicorn (h11).
        std = self.name.startswith("std/")
        self.server = Server(
            self.kind,
            http_impl="httptools" if std else "h11",
            loop="uvloop" if std else "asyncio",
            flush=None,
        ).__enter__()
        self.starts += 1
        procs = 2 if self.clients <= 100 else 3
        paths = [f"/events/{ROOM}"] * self.clients
        self.group = Clients(
            self.server.port, paths, expect=0, procs=procs, latency=True, steps=True
        )
        self.group.wait_ready()
        self.server.wait_subscribers(self.clients)

    def stop(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()


def measure_step(stack: Stack, rate: int, seconds: float, p99_bound_ms: float) -> dict[str, Any]:
    """Publish `rate` events/s for `seconds` to the stack's clients; did they keep up?"""
    server, group = stack.server, stack.group
    assert server is not None
    assert group is not None
    n = max(1, round(rate * seconds))
    group.go(seconds + GRACE_S, expect=n, since=time.time())
    cpu0 = server.cpu()
    t0 = time.time()
    server.publish([ROOM], n, rate=rate)
    t1 = time.time()
    cpu1 = server.cpu()
    out = group.step_results()
    elapsed = max(t1 - t0, 1e-6)
    hist = out["hist"]
    res: dict[str, Any] = {
        "rate": rate,
        "events": n,
        "p50_ms": hist_quantile(hist, 0.5) * 1000,
        "p99_ms": hist_quantile(hist, 0.99) * 1000,
        "max_ms": hist_quantile(hist, 1.0) * 1000,
        "received": out["events"] / (n * stack.clients),
        "complete": out["done"],
        "open": out["open"],
        # how late the publisher ended: event i is due at i / rate
        "publish_lag_s": elapsed - (n - 1) / rate,
        "deliveries_per_s": out["events"] / elapsed,
        "server_cpu": (cpu1 - cpu0) / elapsed,
        "clients_cpu": out["cpu"] / elapsed,
    }
    res["fail"] = failure(res, stack.clients, p99_bound_ms)
    return res


def failure(res: dict[str, Any], clients: int, p99_bound_ms: float) -> str:
    """Why a step failed ("" when it passed)."""
    if res["open"] < clients:
        return f"{clients - res['open']} dropped"
    if res["complete"] < clients:
        return f"{clients - res['complete']} missing events"
    if res["publish_lag_s"] > MAX_LAG_SHARE * res["events"] / res["rate"] + LAG_S:
        return f"publisher {res['publish_lag_s']:.1f} s behind"
    if not res["p99_ms"] <= p99_bound_ms:
        return f"p99 {res['p99_ms']:.0f} ms"
    return ""


def search(stack: Stack, args: argparse.Namespace, bar: Any) -> dict[str, Any]:
    """The highest rate whose step passes: double from the start rate, then bisect."""
    steps: list[dict[str, Any]] = []
    passed: dict[int, dict[str, Any]] = {}

    def trial(rate: int) -> bool:
        for attempt in range(1 + args.confirm):
            bar.set_postfix_str(f"{stack.name} R={rate}/s")
            res = measure_step(stack, rate, args.step_seconds, args.p99_ms)
            res["attempt"] = attempt
            steps.append(res)
            if not res["fail"]:
                passed[rate] = res
                return True
            stack.restart()  # a backlog or a dropped client must not spill over
        return False

    low, high = 0, 0
    rate = args.start_rate
    while rate <= args.max_rate:
        if not trial(rate):
            high = rate
            break
        low = rate
        rate *= 2
    for _ in range(args.bisect if high else 0):
        mid = (low + high) // 2
        if mid <= low:
            break
        if trial(mid):
            low = mid
        else:
            high = mid
    lowest = min(s["rate"] for s in steps)
    return {
        "rate": low,
        # the best attempt at the lowest rate tried: what is left when none passed
        "floor": min(
            (s for s in steps if s["rate"] == lowest), key=lambda s: _nan_last(s["p99_ms"])
        ),
        "capped": not high,  # no step failed up to --max-rate
        "first_fail": high or None,
        "at": passed.get(low),
        "steps": steps,
        "restarts": stack.starts - 1,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [n for n in STACKS if not args.only_stacks or n in args.only_stacks.split(",")]
    missing = [n for n in names if not available(STACKS[n])]
    names = [n for n in names if n not in missing]
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with progress(args.runs * len(names), "sustained_fanout", not args.no_progress) as bar:
        for r in range(args.runs):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                stack = Stack(name, args.clients)
                try:
                    stack.start()
                    samples[name].append(search(stack, args, bar))
                finally:
                    stack.stop()
                bar.update()
    result = summarise(samples, args.clients)
    result.update(
        clients=args.clients,
        step_seconds=args.step_seconds,
        p99_bound_ms=args.p99_ms,
        start_rate=args.start_rate,
        max_rate=args.max_rate,
        missing=missing,
    )
    return result


def summarise(samples: dict[str, list[dict[str, Any]]], clients: int) -> dict[str, Any]:
    stacks: dict[str, Any] = {}
    for name, runs in samples.items():
        ats = [run["at"] for run in runs if run["at"]]
        stacks[name] = {
            "rate": median([run["rate"] for run in runs]),
            "deliveries_per_s": median([run["rate"] * clients for run in runs]),
            "measured_deliveries_per_s": median([a["deliveries_per_s"] for a in ats]),
            "p50_ms": median([a["p50_ms"] for a in ats]),
            "p99_ms": median([a["p99_ms"] for a in ats]),
            "server_cpu": median([a["server_cpu"] for a in ats]),
            "clients_cpu": median([a["clients_cpu"] for a in ats]),
            "capped": any(run["capped"] for run in runs),
            "runs": [run["rate"] for run in runs],
            "floor_rate": median([run["floor"]["rate"] for run in runs]),
            "floor_p50_ms": median([run["floor"]["p50_ms"] for run in runs]),
            "floor_p99_ms": median([run["floor"]["p99_ms"] for run in runs]),
        }
    ratios: dict[str, float] = {}
    for ours, peer in PAIRS:
        if ours in samples and peer in samples:
            a = [run["rate"] for run in samples[ours]]
            b = [run["rate"] for run in samples[peer]]
            ratios[f"{ours} / {peer}"] = median([x / y for x, y in zip(a, b, strict=False) if y])
    return {"stacks": stacks, "ratios": ratios, "samples": samples}


def markdown(result: dict[str, Any]) -> str:
    c = result["clients"]
    out = [
        f"**Highest publish rate with p99 <= {result['p99_bound_ms']:g} ms** (C={c} clients on"
        f" one room, {result['step_seconds']:g} s steps; median of runs; latency and CPU at"
        " that rate, CPU in % of one core)\n"
    ]
    rows = []
    for name, s in result["stacks"].items():
        rate = f"{'>= ' if s['capped'] else ''}{s['rate']:g}"
        latency = f"{fmt(s['p50_ms'], 1)} / {fmt(s['p99_ms'], 1)}"
        if not s["rate"]:  # none passed: how far off the lowest rate tried was
            rate = f"< {s['floor_rate']:g}"
            latency = (
                f"{fmt(s['floor_p50_ms'], 1)} / {fmt(s['floor_p99_ms'], 1)}"
                f" (at {s['floor_rate']:g}/s, failed)"
            )
        rows.append(
            [
                name,
                rate,
                fmt(s["deliveries_per_s"], 0),
                latency,
                _percent(s["server_cpu"]),
                _percent(s["clients_cpu"]),
                "/".join(f"{r:g}" for r in s["runs"]),
            ]
        )
    header = [
        "stack",
        "events/s",
        "deliveries/s",
        "p50 / p99 (ms)",
        "server CPU",
        "clients CPU",
        "runs (events/s)",
    ]
    out.append(table(header, rows))
    if result["ratios"]:
        out.append("\n**Ratios** of the highest passing rates (median of per-run ratios)\n")
        out.append(table(["pair", "ratio"], [[k, _times(v)] for k, v in result["ratios"].items()]))
    out.append("\n**Search of the first run** (events/s; a failing step with its reason)\n")
    rows = []
    for name, runs in result["samples"].items():
        if runs:
            path = [
                f"{s['rate']}" if not s["fail"] else f"~~{s['rate']}~~ ({s['fail']})"
                for s in runs[0]["steps"]
            ]
            rows.append([name, ", ".join(path)])
    out.append(table(["stack", "steps"], rows))
    return "\n".join(out)


def _nan_last(value: float) -> float:
    return float("inf") if value != value else value


def _times(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}x"


def _percent(value: float) -> str:
    return "n/a" if value != value else f"{value * 100:.0f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 clients, 2 s steps, 1 run")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--step-seconds", type=float, default=5.0)
    parser.add_argument("--p99-ms", type=float, default=50.0, help="the latency bound")
    parser.add_argument("--start-rate", type=int, default=10, help="events/s of the first step")
    parser.add_argument("--max-rate", type=int, default=5000, help="stop doubling here")
    parser.add_argument("--bisect", type=int, default=3, help="bisection steps after doubling")
    parser.add_argument("--confirm", type=int, default=1, help="retries of a failing step")
    parser.add_argument("--only-stacks", default="", help=f"of: {', '.join(STACKS)}")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.clients, args.step_seconds = 1, 20, 0.5
        args.max_rate, args.bisect, args.confirm = 40, 1, 0
        args.no_progress = True
    elif args.quick:
        args.runs = min(args.runs, 1)
        args.clients, args.step_seconds, args.bisect = 200, 2.0, 2
    for flag in ("runs", "clients", "start_rate", "max_rate"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.step_seconds > 0 or not args.p99_ms > 0 or args.bisect < 0 or args.confirm < 0:
        parser.error("--step-seconds and --p99-ms must be > 0, --bisect and --confirm >= 0")
    unknown = set(filter(None, args.only_stacks.split(","))) - set(STACKS)
    if unknown:
        parser.error(f"unknown stack(s) {sorted(unknown)}; choose from {list(STACKS)}")
    result = run(args)
    stamp(result, "sustained_fanout.py")
    save_results(
        "sustained_fanout", result, markdown(result), smoke=args.smoke, json_path=args.json
    )


if __name__ == "__main__":
    main()
