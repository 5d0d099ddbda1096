"""Sweeps with an injected clock: event TTL, session expiry, counters, memory pressure, sweeper."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import sse_broadcaster._metrics as metrics_module
from sse_broadcaster import BroadcasterConfig, EventBroadcaster, MemoryMetrics
from sse_broadcaster._metrics import process_memory_mb

from .support.clock import FakeClock

pytestmark = pytest.mark.anyio

LOGGER = "sse_broadcaster"


def cleanup_stats(broadcaster: EventBroadcaster) -> dict[str, Any]:
    stats = broadcaster.stats()
    return {key: stats[key] for key in ("totalSessions", "totalSubscribers", "totalEvents")} | {
        key: stats["cleanup"][key]
        for key in ("expiredEventsCleaned", "deadQueuesCleaned", "sessionsExpired")
    }


async def test_event_ttl_expiry() -> None:
    clock = FakeClock()
    config = BroadcasterConfig(event_ttl=10.0)
    async with EventBroadcaster(config, clock=clock) as broadcaster:
        old = [await broadcaster.publish("a", str(i)) for i in range(3)]
        old.append(await broadcaster.publish("b", "b0"))
        clock.advance(5)
        new = [await broadcaster.publish("a", str(i)) for i in range(3, 5)]
        clock.advance(5)  # the old events are exactly event_ttl old: expired

        # Expired events are not replayed even before a sweep removes them.
        assert await broadcaster.history("a") == new
        assert await broadcaster.history("b") == []
        async with broadcaster.subscribe("a", last_event_id=old[0].id) as sub:
            assert sub.gap  # old[1] and old[2] are gone
            assert sub.drain_nowait() == new
        async with broadcaster.subscribe("a", last_event_id=old[2].id) as sub:
            assert not sub.gap  # nothing after old[2] was lost
            assert sub.drain_nowait() == new
        assert cleanup_stats(broadcaster)["totalEvents"] == 6

        metrics = await broadcaster.cleanup()
        assert metrics.expired_events_cleaned == 4
        assert cleanup_stats(broadcaster) == {
            "totalSessions": 1,  # "b" retains nothing now: released, not expired
            "totalSubscribers": 0,
            "totalEvents": 2,
            "expiredEventsCleaned": 4,
            "deadQueuesCleaned": 0,
            "sessionsExpired": 0,
        }
        assert broadcaster.stats()["cleanup"]["lastCleanupTime"] == clock.now

        # Nothing more to do: a second sweep removes nothing.
        await broadcaster.cleanup()
        assert cleanup_stats(broadcaster)["expiredEventsCleaned"] == 4

        clock.advance(5)
        await broadcaster.cleanup()
        assert cleanup_stats(broadcaster)["expiredEventsCleaned"] == 6
        assert await broadcaster.history("a") == []
        # The ids keep counting after everything expired; an up-to-date client has no gap.
        async with broadcaster.subscribe("a", last_event_id=new[-1].id) as sub:
            assert not sub.gap
            following = await broadcaster.publish("a", "5")
            assert await sub.receive() is following
            assert following.id.endswith("-6")


async def test_no_event_ttl_keeps_events() -> None:
    clock = FakeClock()
    async with EventBroadcaster(
        BroadcasterConfig(event_ttl=None, session_ttl=1e12), clock=clock
    ) as broadcaster:
        event = await broadcaster.publish("a", "x")
        clock.advance(10**9)
        await broadcaster.cleanup()
        assert await broadcaster.history("a") == [event]
        assert cleanup_stats(broadcaster)["expiredEventsCleaned"] == 0


async def test_session_idle_expiry_not_while_subscribed() -> None:
    clock = FakeClock()
    config = BroadcasterConfig(session_ttl=100.0, event_ttl=None)
    async with EventBroadcaster(config, clock=clock) as broadcaster:
        gone = await broadcaster.publish("idle", "x")
        await broadcaster.publish("watched", "x")
        sub = await broadcaster.subscribe("watched").__aenter__()
        clock.advance(99)
        await broadcaster.cleanup()
        assert cleanup_stats(broadcaster)["sessionsExpired"] == 0

        clock.advance(1)
        await broadcaster.cleanup()
        assert cleanup_stats(broadcaster) == {
            "totalSessions": 1,
            "totalSubscribers": 1,
            "totalEvents": 1,
            "expiredEventsCleaned": 0,
            "deadQueuesCleaned": 0,
            "sessionsExpired": 1,
        }
        assert await broadcaster.history("idle") == []

        clock.advance(1000)  # subscribed: never expires, however long
        await broadcaster.cleanup()
        assert cleanup_stats(broadcaster)["sessionsExpired"] == 1

        # Idle time counts from the moment the last subscriber left.
        await sub.aclose()
        clock.advance(99)
        await broadcaster.cleanup()
        assert cleanup_stats(broadcaster)["totalSessions"] == 1
        clock.advance(1)
        await broadcaster.cleanup()
        assert cleanup_stats(broadcaster)["sessionsExpired"] == 2
        assert cleanup_stats(broadcaster)["totalSessions"] == 0
        assert cleanup_stats(broadcaster)["totalEvents"] == 0

        # A session that comes back is a new one: an old id is a gap.
        again = await broadcaster.publish("idle", "again")
        assert again.id.endswith("-1")
        assert again.id != gone.id
        async with broadcaster.subscribe("idle", last_event_id=gone.id) as sub:
            assert sub.gap
            assert sub.drain_nowait() == [again]


async def test_publishing_keeps_a_session_alive() -> None:
    clock = FakeClock()
    async with EventBroadcaster(BroadcasterConfig(session_ttl=100.0), clock=clock) as broadcaster:
        for _ in range(5):
            await broadcaster.publish("busy", "x")
            clock.advance(60)
            await broadcaster.cleanup()
        assert cleanup_stats(broadcaster)["sessionsExpired"] == 0


async def test_metrics_and_counters() -> None:
    clock = FakeClock()
    async with EventBroadcaster(BroadcasterConfig(event_ttl=1.0), clock=clock) as broadcaster:
        empty = broadcaster.metrics()
        assert isinstance(empty, MemoryMetrics)
        assert (empty.cleanup_count, empty.expired_events_cleaned) == (0, 0)
        assert empty.process_memory_mb > 0
        for i in range(100):
            await broadcaster.publish(f"s{i % 4}", "x" * 1000)
        full = broadcaster.metrics()
        assert full.broadcaster_memory_estimate_mb > empty.broadcaster_memory_estimate_mb
        assert full.broadcaster_memory_estimate_mb > 100 * 1000 / 2**20  # at least the bytes held
        clock.advance(1)
        swept = await broadcaster.cleanup()
        assert (swept.cleanup_count, swept.expired_events_cleaned) == (1, 100)
        assert swept.broadcaster_memory_estimate_mb < full.broadcaster_memory_estimate_mb
        assert broadcaster.metrics().cleanup_count == 1


# -- memory thresholds ------------------------------------------------------------------------


async def test_warning_threshold_below_rss_logs_and_calls_a_sync_hook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[tuple[str, MemoryMetrics]] = []
    config = BroadcasterConfig(memory_warning_threshold_mb=1.0, memory_critical_threshold_mb=10**9)
    hook = lambda level, metrics: calls.append((level, metrics))  # noqa: E731
    async with EventBroadcaster(config, on_memory_pressure=hook) as broadcaster:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            metrics = await broadcaster.cleanup()
            await broadcaster.cleanup()  # the same level again: no new log, no new call
        assert calls == [("warning", metrics)]
        [record] = [r for r in caplog.records if r.name == LOGGER]
        assert record.levelno == logging.WARNING
        assert "is over memory_warning_threshold_mb=1.0" in record.getMessage()
        assert broadcaster.stats()["memoryPressure"] == "warning"


async def test_critical_threshold_below_rss_logs_and_awaits_an_async_hook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    async def hook(level: str, metrics: MemoryMetrics) -> None:
        await anyio.lowlevel.checkpoint()
        calls.append(level)

    config = BroadcasterConfig(memory_warning_threshold_mb=1.0, memory_critical_threshold_mb=1.0)
    async with EventBroadcaster(config, on_memory_pressure=hook) as broadcaster:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            await broadcaster.cleanup()
        assert calls == ["critical"]
        [record] = [r for r in caplog.records if r.name == LOGGER]
        assert record.levelno == logging.ERROR
        assert "is over memory_critical_threshold_mb=1.0" in record.getMessage()


async def test_threshold_transitions(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rss = [50.0]
    monkeypatch.setattr(metrics_module, "process_memory_bytes", lambda: int(rss[0] * 2**20))
    calls: list[str] = []
    config = BroadcasterConfig(
        memory_warning_threshold_mb=100.0, memory_critical_threshold_mb=200.0
    )
    async with EventBroadcaster(
        config, on_memory_pressure=lambda level, _: calls.append(level)
    ) as broadcaster:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            for value in (50.0, 100.0, 150.0, 200.0, 250.0, 120.0, 99.9, 99.0, 300.0):
                rss[0] = value
                await broadcaster.cleanup()
        assert calls == ["warning", "critical", "warning", "critical"]
        assert [
            (r.levelname, r.getMessage().split(" MB")[0])
            for r in caplog.records
            if r.name == LOGGER
        ] == [
            ("WARNING", "process memory 100.0"),
            ("ERROR", "process memory 200.0"),
            ("WARNING", "process memory 120.0"),
            ("INFO", "process memory back to 99.9"),
            ("ERROR", "process memory 300.0"),
        ]


async def test_a_failing_hook_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def hook(level: str, metrics: MemoryMetrics) -> None:
        raise RuntimeError("hook broke")

    config = BroadcasterConfig(memory_warning_threshold_mb=1.0, memory_critical_threshold_mb=10**9)
    async with EventBroadcaster(config, on_memory_pressure=hook) as broadcaster:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            metrics = await broadcaster.cleanup()
        assert metrics.cleanup_count == 1
        failures = [r for r in caplog.records if r.getMessage() == "on_memory_pressure hook failed"]
        assert len(failures) == 1
        assert failures[0].exc_info is not None
        assert "hook broke" in str(failures[0].exc_info[1])


async def test_metrics_disabled_skips_thresholds(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    config = BroadcasterConfig(
        enable_metrics=False, memory_warning_threshold_mb=1.0, memory_critical_threshold_mb=1.0
    )
    async with EventBroadcaster(
        config, on_memory_pressure=lambda level, _: calls.append(level)
    ) as broadcaster:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            await broadcaster.cleanup()
        assert calls == []
        assert [r for r in caplog.records if r.name == LOGGER] == []
        assert broadcaster.stats()["memoryPressure"] is None


def test_process_memory_mb_reads_rss() -> None:
    assert process_memory_mb() > 1.0


# -- the background sweeper ---------------------------------------------------------------------


async def test_background_sweeper_runs_every_cleanup_interval() -> None:
    clock = FakeClock()
    config = BroadcasterConfig(cleanup_interval=0.05, event_ttl=1.0)
    async with EventBroadcaster(config, clock=clock) as broadcaster:
        await broadcaster.publish("a", "x")
        clock.advance(2)
        with anyio.fail_after(10):  # a bounded wait, not a timing assertion
            while broadcaster.metrics().cleanup_count < 3:
                await anyio.sleep(0.01)
        assert broadcaster.stats()["cleanup"]["expiredEventsCleaned"] == 1
    count = broadcaster.metrics().cleanup_count
    await anyio.sleep(0.15)
    assert broadcaster.metrics().cleanup_count == count  # stopped with the broadcaster


async def test_background_sweeper_survives_a_failing_sweep(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = BroadcasterConfig(cleanup_interval=0.02)
    async with EventBroadcaster(config) as broadcaster:
        real_sweep = broadcaster.backend.sweep
        failures = [1]

        async def flaky_sweep() -> Any:
            if failures:
                failures.pop()
                raise OSError("sweep broke")
            return await real_sweep()

        monkeypatch.setattr(broadcaster.backend, "sweep", flaky_sweep)
        with caplog.at_level(logging.ERROR, logger=LOGGER), anyio.fail_after(10):
            while broadcaster.metrics().cleanup_count < 2:
                await anyio.sleep(0.01)
        [record] = [r for r in caplog.records if r.name == LOGGER]
        assert record.getMessage() == "sse_broadcaster sweep failed; retrying next interval"
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], OSError)


async def test_thresholds_log_without_a_hook(caplog: pytest.LogCaptureFixture) -> None:
    config = BroadcasterConfig(memory_warning_threshold_mb=1.0, memory_critical_threshold_mb=10**9)
    async with EventBroadcaster(config) as broadcaster:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            await broadcaster.cleanup()
        assert [r.levelname for r in caplog.records if r.name == LOGGER] == ["WARNING"]
