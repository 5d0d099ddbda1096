"""The core suite's behavioural tests, run again on RedisBackend.

Every `EventBroadcaster()` made without a backend gets a `RedisBackend` on the
test Redis, with a key prefix of its own, instead of the in-memory default. The
tests listed are those whose semantics are the same on both backends; left out
are the ones that check memory-backend details: the id format ("<epoch>-<n>"),
identity of the delivered Event object (Redis delivers a decoded copy),
session counts (RedisBackend counts the sessions a process follows), injected
clocks for TTLs (Redis ages events by its own clock), and trio.
"""

from __future__ import annotations

import uuid

import pytest

import tests.test_broadcaster as core
import tests.test_subscription as subscription
from sse_broadcaster import _broadcaster
from sse_broadcaster.redis import RedisBackend

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

CORE = [
    "test_replay_after_last_event_id_then_live",
    "test_empty_last_event_id_counts_as_none",
    "test_last_event_id_of_the_latest_event_replays_nothing",
    "test_unknown_or_malformed_last_event_id_sets_gap_and_replays_everything",
    "test_last_event_id_older_than_history_sets_gap",
    "test_history_after",
    "test_aclose_ends_1000_subscriptions_within_1s",
    "test_leaving_async_with_ends_1000_subscriptions_within_1s",
]
SUBSCRIPTION = [
    "test_receive_batch_includes_replay_then_live_in_order",
    "test_disconnect_raises_after_the_queued_events_and_resume_replays_the_rest",
    "test_async_for_ends_after_queued_events",
    "test_ending_keeps_replayed_and_live_events_in_order",
]

for _module, _names in ((core, CORE), (subscription, SUBSCRIPTION)):
    for _name in _names:
        globals()[_name] = getattr(_module, _name)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _redis_by_default(
    monkeypatch: pytest.MonkeyPatch,
    redis_server: str,
) -> None:
    def backend() -> RedisBackend:
        return RedisBackend(redis_server, prefix=f"p{uuid.uuid4().hex[:10]}")

    monkeypatch.setattr(_broadcaster, "MemoryBackend", backend)
