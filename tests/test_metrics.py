"""_metrics: RSS readings, the Prometheus exposition, and when RSS is read."""

from __future__ import annotations

import re

import anyio
import pytest

from sse_broadcaster import BroadcasterConfig, EventBroadcaster
from sse_broadcaster._metrics import (
    Counters,
    process_memory_bytes,
    process_memory_mb,
    render_metrics,
    rss_reads,
)

pytestmark = pytest.mark.anyio

COUNTERS = Counters(
    sessions=3,
    subscribers=4,
    history_events=5,
    published=10,
    delivered=11,
    dropped=12,
    slow_disconnects=13,
    gaps=16,
    replays=14,
    replayed_events=15,
    expired_events=6,
    dead_queues=7,
    sessions_expired=8,
    cleanups=9,
    last_cleanup=1.5,
    process_memory_bytes=35861299,
    memory_estimate_bytes=2097152,
    runs_running=2,
    runs_retained=3,
    runs_started=9,
    runs_finished=4,
    runs_failed=2,
    runs_cancelled=1,
    runs_expired=5,
    run_transcript_bytes=4096,
    memory_pressure=None,
)
REDIS_STATS = {"type": "redis", "connected": True, "reconnects": 17, "recoveredEvents": 18}
OPEN_STREAMS = [("sse_broadcaster_open_streams", "gauge", "Open SSE streams.", 19)]

# The exposition of 0.1 (names, HELP, TYPE, order), bar the RSS gauge that read
# 35861299.2: MB rounded to 0.1 and scaled back to bytes.
EXPECTED = """\
# HELP sse_broadcaster_sessions Sessions that exist now.
# TYPE sse_broadcaster_sessions gauge
sse_broadcaster_sessions 3
# HELP sse_broadcaster_subscribers Open subscriptions.
# TYPE sse_broadcaster_subscribers gauge
sse_broadcaster_subscribers 4
# HELP sse_broadcaster_history_events Events retained in history.
# TYPE sse_broadcaster_history_events gauge
sse_broadcaster_history_events 5
# HELP sse_broadcaster_events_published_total Events published.
# TYPE sse_broadcaster_events_published_total counter
sse_broadcaster_events_published_total 10
# HELP sse_broadcaster_events_delivered_total Events queued to subscribers.
# TYPE sse_broadcaster_events_delivered_total counter
sse_broadcaster_events_delivered_total 11
# HELP sse_broadcaster_events_dropped_total Events dropped by the drop_oldest / drop_newest policies.
# TYPE sse_broadcaster_events_dropped_total counter
sse_broadcaster_events_dropped_total 12
# HELP sse_broadcaster_slow_subscriber_disconnects_total Subscribers disconnected for falling behind.
# TYPE sse_broadcaster_slow_subscriber_disconnects_total counter
sse_broadcaster_slow_subscriber_disconnects_total 13
# HELP sse_broadcaster_gaps_total Subscriptions that resumed after events were lost.
# TYPE sse_broadcaster_gaps_total counter
sse_broadcaster_gaps_total 16
# HELP sse_broadcaster_replays_total Subscriptions that resumed from an id.
# TYPE sse_broadcaster_replays_total counter
sse_broadcaster_replays_total 14
# HELP sse_broadcaster_replayed_events_total Events replayed from history.
# TYPE sse_broadcaster_replayed_events_total counter
sse_broadcaster_replayed_events_total 15
# HELP sse_broadcaster_expired_events_total Events removed from history by TTL.
# TYPE sse_broadcaster_expired_events_total counter
sse_broadcaster_expired_events_total 6
# HELP sse_broadcaster_dead_queues_cleaned_total Abandoned subscriptions removed by sweeps.
# TYPE sse_broadcaster_dead_queues_cleaned_total counter
sse_broadcaster_dead_queues_cleaned_total 7
# HELP sse_broadcaster_sessions_expired_total Idle sessions expired.
# TYPE sse_broadcaster_sessions_expired_total counter
sse_broadcaster_sessions_expired_total 8
# HELP sse_broadcaster_cleanups_total Sweeps run.
# TYPE sse_broadcaster_cleanups_total counter
sse_broadcaster_cleanups_total 9
# HELP sse_broadcaster_process_resident_memory_bytes Process resident set size.
# TYPE sse_broadcaster_process_resident_memory_bytes gauge
sse_broadcaster_process_resident_memory_bytes 35861299
# HELP sse_broadcaster_memory_estimate_bytes Estimate of the memory the broadcaster holds.
# TYPE sse_broadcaster_memory_estimate_bytes gauge
sse_broadcaster_memory_estimate_bytes 2097152
# HELP sse_broadcaster_runs_running Runs running now.
# TYPE sse_broadcaster_runs_running gauge
sse_broadcaster_runs_running 2
# HELP sse_broadcaster_runs_retained Ended runs whose transcript is still resumable.
# TYPE sse_broadcaster_runs_retained gauge
sse_broadcaster_runs_retained 3
# HELP sse_broadcaster_runs_started_total Runs started here.
# TYPE sse_broadcaster_runs_started_total counter
sse_broadcaster_runs_started_total 9
# HELP sse_broadcaster_runs_finished_total Runs started here that finished.
# TYPE sse_broadcaster_runs_finished_total counter
sse_broadcaster_runs_finished_total 4
# HELP sse_broadcaster_runs_failed_total Runs started here that failed.
# TYPE sse_broadcaster_runs_failed_total counter
sse_broadcaster_runs_failed_total 2
# HELP sse_broadcaster_runs_cancelled_total Runs started here that were cancelled.
# TYPE sse_broadcaster_runs_cancelled_total counter
sse_broadcaster_runs_cancelled_total 1
# HELP sse_broadcaster_runs_expired_total Run transcripts swept after run_ttl.
# TYPE sse_broadcaster_runs_expired_total counter
sse_broadcaster_runs_expired_total 5
# HELP sse_broadcaster_run_transcript_bytes Encoded bytes retained for run transcripts.
# TYPE sse_broadcaster_run_transcript_bytes gauge
sse_broadcaster_run_transcript_bytes 4096
# HELP sse_broadcaster_backend_connected 1 when the backend is connected (shared backends only).
# TYPE sse_broadcaster_backend_connected gauge
sse_broadcaster_backend_connected 1
# HELP sse_broadcaster_backend_reconnects_total Reconnections to the backend.
# TYPE sse_broadcaster_backend_reconnects_total counter
sse_broadcaster_backend_reconnects_total 17
# HELP sse_broadcaster_backend_recovered_events_total Events recovered from backend history after a lost connection.
# TYPE sse_broadcaster_backend_recovered_events_total counter
sse_broadcaster_backend_recovered_events_total 18
# HELP sse_broadcaster_open_streams Open SSE streams.
# TYPE sse_broadcaster_open_streams gauge
sse_broadcaster_open_streams 19
"""  # noqa: E501


def test_exposition_is_exact() -> None:
    assert render_metrics(COUNTERS, REDIS_STATS, OPEN_STREAMS) == EXPECTED


def test_backend_figures_a_backend_lacks_are_left_out() -> None:
    text = render_metrics(COUNTERS, {"type": "memory", "sessions": 3}, OPEN_STREAMS)
    assert "sse_broadcaster_backend_" not in text
    assert text.endswith("sse_broadcaster_open_streams 19\n")
    assert render_metrics(COUNTERS) == render_metrics(COUNTERS, {})


def test_a_false_connected_is_zero() -> None:
    text = render_metrics(COUNTERS, {"connected": False})
    assert "\nsse_broadcaster_backend_connected 0\n" in text


async def test_bytes_gauges_are_whole_bytes_of_the_unrounded_reading() -> None:
    async with EventBroadcaster() as broadcaster:
        for i in range(10):
            await broadcaster.publish(f"s{i}", "x" * 333)
        before = process_memory_bytes()
        text = broadcaster._prometheus_text()
        after = process_memory_bytes()
    samples = dict(line.split(" ") for line in text.splitlines() if not line.startswith("#"))
    rss = samples["sse_broadcaster_process_resident_memory_bytes"]
    estimate = samples["sse_broadcaster_memory_estimate_bytes"]
    assert re.fullmatch(r"[1-9][0-9]*", rss), rss
    assert re.fullmatch(r"[1-9][0-9]*", estimate), estimate
    # Not a multiple of 0.1 MB scaled back: within the readings taken around it.
    assert min(before, after) - 2**20 <= int(rss) <= max(before, after) + 2**20


def test_process_memory_readings_agree() -> None:
    assert process_memory_bytes() > 2**20
    assert process_memory_mb() > 1.0


async def test_sweeps_do_not_read_rss_when_metrics_are_disabled() -> None:
    # docs/configuration.md: with enable_metrics=False sweeps take no memory reading.
    config = BroadcasterConfig(enable_metrics=False, cleanup_interval=0.01)
    async with EventBroadcaster(config) as broadcaster:
        await broadcaster.publish("room", "x")
        reads = rss_reads()
        metrics = await broadcaster.cleanup()
        with anyio.fail_after(10):
            while True:  # let the background sweeper run a few times
                await anyio.sleep(0.01)
                swept = broadcaster.stats()["cleanup"]["cleanupCount"]
                reads += 1  # stats() reads RSS: it was asked for
                if swept >= 4:
                    break
        assert rss_reads() == reads
        assert metrics.process_memory_mb == 0.0
        assert metrics.cleanup_count == 1


async def test_sweeps_read_rss_once_when_metrics_are_enabled() -> None:
    async with EventBroadcaster(BroadcasterConfig(enable_metrics=True)) as broadcaster:
        reads = rss_reads()
        metrics = await broadcaster.cleanup()
        assert rss_reads() == reads + 1
        assert metrics.process_memory_mb > 1.0
