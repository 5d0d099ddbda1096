"""Every benchmark of tests/performance/ and the load test, in smoke mode.

Each runs for a few seconds in a subprocess so that none of them rots; only
the shape of the output is checked (keys present, numbers where numbers
belong). No timing is asserted: these are benchmarks, and CI machines are
noisy. Peer stacks (sse-starlette, aiohttp-sse, encode/broadcaster) and locust
come with requirements/bench.txt: when they are installed their rows are checked
too; without them the benchmarks run our stacks only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PERF = ROOT / "tests" / "performance"


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


PEERS_STARLETTE = _has("sse_starlette", "broadcaster")
PEERS_AIOHTTP = _has("aiohttp_sse", "broadcaster")
ENCODE = _has("broadcaster")


def _run(args: list[str], timeout: float = 100) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def _table(text: str) -> None:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, text
    assert set(lines[1].replace("|", "")) <= {"-"}


def test_fanout_smoke(tmp_path: Path) -> None:
    if not ENCODE:  # bench_fanout always runs encode/broadcaster: check it still parses
        assert "--runs" in _run([str(PERF / "bench_fanout.py"), "--help"])
        return
    out = tmp_path / "fanout.json"
    text = _run(
        [
            str(PERF / "bench_fanout.py"),
            "--quick",
            "--runs",
            "1",
            "--idle",
            "1000",
            "--json",
            str(out),
        ]
    )
    _table(text)
    data = json.loads(out.read_text())
    assert data["rows"]
    for row in data["rows"]:
        for impl in ("ours", "encode", "queue"):
            assert _finite(row[impl]["deliveries_per_s"])
        assert _finite(row["vs_encode"])
    assert _finite(data["idle_subscription_bytes"])


def test_seed_scenarios_smoke(tmp_path: Path) -> None:
    out = tmp_path / "seed.json"
    _table(_run([str(PERF / "seed_scenarios.py"), "--smoke", "--json", str(out)]))
    data = json.loads(out.read_text())
    scenarios = {"sustained", "burst", "many_sessions", "concurrent"}
    stacks = ["ours", "ours-aiohttp"]
    stacks += ["sse-starlette"] if PEERS_STARLETTE else []
    stacks += ["aiohttp-sse"] if PEERS_AIOHTTP else []
    for stack in stacks:
        assert set(data["http"][stack]) == scenarios
        assert all(_finite(v) and v > 0 for v in data["http"][stack].values())
    for impl in ["ours", *(["encode"] if ENCODE else [])]:
        assert set(data["inproc"][impl]) == scenarios
        assert all(_finite(v) and v > 0 for v in data["inproc"][impl].values())
    assert data["machine"]["cores"] >= 1
    assert "seed_scenarios.py" in data["command"]


def test_http_e2e_smoke(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    _table(_run([str(PERF / "http_e2e.py"), "--smoke", "--json", str(out)]))
    data = json.loads(out.read_text())
    expected = ["ours", "bare", "aiohttp/ours"]
    expected += ["sse-starlette"] if PEERS_STARLETTE else []
    for stack in expected:
        burst = data["burst"][stack]["5"]
        assert _finite(burst["deliveries_per_s"])
        assert burst["deliveries_per_s"] > 0
        assert _finite(burst["server_cpu"])
        assert burst["complete"] is True
        paced = data["paced"][stack]["5"]
        for key in ("p50_ms", "p99_ms", "received", "server_cpu"):
            assert _finite(paced[key]), (stack, key, paced)
    assert all(_finite(v) for v in data["ratios"].values())
    assert "ours / bare @ C=5" in data["ratios"]


def test_sustained_fanout_smoke(tmp_path: Path) -> None:
    out = tmp_path / "sustained.json"
    text = _run([str(PERF / "sustained_fanout.py"), "--smoke", "--json", str(out)])
    _table(text)
    data = json.loads(out.read_text())
    assert data["clients"] == 20
    expected = ["ours", "bare", "std/ours", "std/bare", "aiohttp/ours"]
    expected += ["sse-starlette", "std/sse-starlette"] if PEERS_STARLETTE else []
    expected += ["aiohttp/aiohttp-sse"] if PEERS_AIOHTTP else []
    assert sorted(data["stacks"]) == sorted(expected)
    for stack in expected:
        s = data["stacks"][stack]
        assert _number(s["rate"])
        assert s["rate"] >= 0
        assert _number(s["deliveries_per_s"])
        for key in ("p50_ms", "p99_ms", "server_cpu"):
            assert _number(s[key]), (stack, key)  # NaN when no step passed
        (run,) = data["samples"][stack]
        assert run["steps"], stack
        for step in run["steps"]:
            assert step["rate"] >= 1
            assert isinstance(step["fail"], str)
            assert _finite(step["received"])
            assert _finite(step["server_cpu"])
    assert all(_number(v) for v in data["ratios"].values())
    assert "ours / bare" in data["ratios"]
    assert "sustained_fanout.py --smoke" in data["command"]


def test_connections_smoke(tmp_path: Path) -> None:
    out = tmp_path / "conn.json"
    _table(_run([str(PERF / "connections.py"), "--smoke", "--json", str(out)]))
    data = json.loads(out.read_text())
    assert data["connections"] == 50
    stacks = ["ours", *(["sse-starlette"] if PEERS_STARLETTE else [])]
    for stack in stacks:
        r = data["stacks"][stack]
        for key in ("baseline_mb", "loaded_mb", "added_kb_per_conn", "total_kb_per_conn"):
            assert _finite(r[key]), (stack, key)
        assert _finite(r["deliver_all_s"])
        assert r["delivered"] == 50
        assert _finite(r["idle_cpu"])
        assert r["idle_cpu"] >= 0


def test_memory_soak_smoke(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    _table(
        _run(
            [
                str(PERF / "benchmark_sse_memory.py"),
                "--smoke",
                "--duration",
                "4",
                "--json",
                str(out),
            ]
        )
    )
    data = json.loads(out.read_text())
    impls = ["ours", "harness", *(["encode"] if ENCODE else [])]
    assert sorted(data["impls"]) == sorted(impls)
    for impl in impls:
        r = data["impls"][impl]
        assert _finite(r["peak_mb"])
        assert r["peak_mb"] > 0
        assert _number(r["growth_mb_per_hour"])  # NaN when the run is shorter than the warm-up
        assert _number(r["growth_second_half_mb_per_hour"])
        assert len(r["rss"]) >= 2
        assert r["counters"]["published"] > 0
    counters = data["impls"]["ours"]["counters"]
    for key in ("expired_events_cleaned", "dead_queues_cleaned", "sessions_expired"):
        assert _number(counters[key])
    assert counters["cleanup_count"] >= 1


def test_load_test_smoke() -> None:
    _table(_run([str(PERF / "run.py"), "--smoke", "--only", "load_test"]))
    data = json.loads((PERF / "results" / "load_test-smoke.json").read_text())
    names = {row["name"] for row in data["rows"]}
    assert "POST /publish/[room]" in names
    for row in data["rows"]:
        assert _number(row["p95_ms"])
        assert row["failures"] == 0, row
    assert "tests/load_test/load_test.py" in data["command"]


def test_bench_responses_smoke(tmp_path: Path) -> None:
    out = tmp_path / "responses.json"
    text = _run([str(PERF / "bench_responses.py"), "--smoke", "--json", str(out)])
    _table(text)
    data = json.loads(out.read_text())
    gen = data["generators"]
    stacks = ["ours", *(["sse-starlette"] if _has("sse_starlette") else [])]
    assert sorted(gen["burst"]) == sorted(stacks)
    for stack in stacks:
        burst = gen["burst"][stack]["5"]
        assert _finite(burst["deliveries_per_s"])
        assert burst["deliveries_per_s"] > 0
        assert burst["complete"] is True
        paced = gen["paced"][stack]["5"]
        for key in ("p50_ms", "p99_ms", "received", "server_cpu"):
            assert _finite(paced[key]), (stack, key, paced)
    if _has("sse_starlette"):
        assert _finite(gen["ratios"]["ours / sse-starlette @ C=5"])
        assert isinstance(gen["p99"]["5"]["no_worse"], bool)
    multi = data["multi"]
    assert (multi["clients"], multi["sessions"]) == (5, 10)
    assert multi["layouts"]["multi"]["connections"] == 5
    assert multi["layouts"]["separate"]["connections"] == 50
    for layout in multi["layouts"].values():
        for key in ("rss_per_client_kb", "cpu_per_client_pct", "p99_ms", "received"):
            assert _finite(layout[key]), (key, layout)
        assert layout["received"] > 0
    assert set(multi["ratios"]) == {
        "rss_per_client_kb: separate / multi",
        "cpu_per_client_pct: separate / multi",
    }
    assert "bench_responses.py --smoke" in data["command"]
