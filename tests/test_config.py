"""BroadcasterConfig: the reference defaults and a named, exact error for every bad value."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest

from sse_broadcaster import BroadcasterConfig, EventBroadcaster, OverflowPolicy

pytestmark = pytest.mark.anyio

NAN = math.nan
INF = math.inf


def test_defaults_are_the_reference_values() -> None:
    config = BroadcasterConfig()
    assert dataclasses.asdict(config) == {
        "max_queue_size": 1000,
        "max_history_per_session": 500,
        "event_ttl": 300.0,
        "session_ttl": 1800.0,
        "cleanup_interval": 60.0,
        "enable_metrics": True,
        "memory_warning_threshold_mb": 100.0,
        "memory_critical_threshold_mb": 200.0,
        "overflow_policy": OverflowPolicy.DISCONNECT,
        "keepalive_interval": 15.0,
        "retry_ms": 3000,
        "max_sessions": 100_000,
        "max_subscribers_per_session": 10_000,
        "max_event_bytes": 65_536,
        "max_queue_bytes": 1_048_576,
        "max_history_bytes": 67_108_864,
        "send_timeout": 5.0,
        "max_sessions_per_subscription": 16,
        "run_ttl": 3600.0,
        "max_run_events": 100_000,
        "max_run_bytes": 8_388_608,
        "max_runs": 100,
        "run_heartbeat_timeout": 30.0,
    }


def test_frozen_and_keyword_only() -> None:
    config = BroadcasterConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_queue_size = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        BroadcasterConfig(5)  # type: ignore[call-arg]


@pytest.mark.parametrize("policy", ["disconnect", "drop_oldest", "drop_newest"])
def test_overflow_policy_accepts_its_string_value(policy: str) -> None:
    config = BroadcasterConfig(overflow_policy=policy)  # type: ignore[arg-type]
    assert config.overflow_policy is OverflowPolicy(policy)
    assert str(config.overflow_policy) == policy


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param(
            {"event_ttl": None, "retry_ms": None, "max_sessions": None}, id="optional-None"
        ),
        pytest.param(
            {"max_subscribers_per_session": None, "max_history_bytes": None}, id="no-limits"
        ),
        pytest.param({"max_history_per_session": 0, "retry_ms": 0}, id="zero-allowed"),
        pytest.param(
            {"event_ttl": 1, "session_ttl": 1, "cleanup_interval": 0.001}, id="int-seconds"
        ),
        pytest.param(
            {"max_event_bytes": 64, "max_queue_bytes": 64, "max_history_bytes": 64},
            id="minimal-bytes",
        ),
        pytest.param(
            {"memory_warning_threshold_mb": 5, "memory_critical_threshold_mb": 5},
            id="equal-thresholds",
        ),
        pytest.param({"enable_metrics": False, "max_queue_size": 1}, id="small"),
    ],
)
def test_valid_edge_values(changes: dict[str, object]) -> None:
    config = BroadcasterConfig(**changes)  # type: ignore[arg-type]
    for name, value in changes.items():
        assert getattr(config, name) == value


INT_FIELDS = [  # (field, minimum, optional)
    ("max_queue_size", 1, False),
    ("max_history_per_session", 0, False),
    ("retry_ms", 0, True),
    ("max_sessions", 1, True),
    ("max_subscribers_per_session", 1, True),
    ("max_event_bytes", 64, False),
    ("max_sessions_per_subscription", 1, False),
    ("max_run_events", 2, False),
    ("max_run_bytes", 1024, False),
    ("max_runs", 1, False),
]
SECONDS_FIELDS = [  # (field, optional)
    ("event_ttl", True),
    ("session_ttl", False),
    ("cleanup_interval", False),
    ("keepalive_interval", False),
    ("send_timeout", False),
    ("run_ttl", False),
    ("run_heartbeat_timeout", False),
]
MB_FIELDS = ["memory_warning_threshold_mb", "memory_critical_threshold_mb"]


def _int_cases() -> Iterator[Any]:
    for name, minimum, optional in INT_FIELDS:
        kind = "an int or None" if optional else "an int"
        for bad, label in [
            ("5", "str"),
            (True, "bool"),
            (False, "bool-False"),
            (1.0, "float"),
            (NAN, "nan"),
            (INF, "inf"),
        ]:
            yield pytest.param(
                name, bad, TypeError, f"{name} must be {kind}, got {bad!r}", id=f"{name}-{label}"
            )
        if not optional:
            yield pytest.param(
                name, None, TypeError, f"{name} must be {kind}, got None", id=f"{name}-None"
            )
        yield pytest.param(
            name,
            minimum - 1,
            ValueError,
            f"{name} must be >= {minimum}, got {minimum - 1}",
            id=f"{name}-below-min",
        )
        yield pytest.param(
            name,
            -(10**30),
            ValueError,
            f"{name} must be >= {minimum}, got {-(10**30)}",
            id=f"{name}-huge-negative",
        )


def _number_cases(name: str, optional: bool, unit: str) -> Iterator[Any]:
    kind = f"a number of {unit} or None" if optional else f"a number of {unit}"
    for bad, label in [
        ("5", "str"),
        (True, "bool"),
        (False, "bool-False"),
        ([1], "list"),
        (1j, "complex"),
    ]:
        yield pytest.param(
            name, bad, TypeError, f"{name} must be {kind}, got {bad!r}", id=f"{name}-{label}"
        )
    if not optional:
        yield pytest.param(
            name, None, TypeError, f"{name} must be {kind}, got None", id=f"{name}-None"
        )
    for bad, label in [
        (0, "zero"),
        (0.0, "zero-float"),
        (-1.5, "negative"),
        (NAN, "nan"),
        (INF, "inf"),
        (-INF, "-inf"),
    ]:
        yield pytest.param(
            name,
            bad,
            ValueError,
            f"{name} must be a finite number > 0, got {bad!r}",
            id=f"{name}-{label}",
        )


def _all_cases() -> Iterator[Any]:
    yield from _int_cases()
    for name, optional in SECONDS_FIELDS:
        yield from _number_cases(name, optional, "seconds")
    for name in MB_FIELDS:
        yield from _number_cases(name, False, "MB")
    for bad, label in [(1, "int"), ("yes", "str"), (None, "None")]:
        yield pytest.param(
            "enable_metrics",
            bad,
            TypeError,
            f"enable_metrics must be a bool, got {bad!r}",
            id=f"enable_metrics-{label}",
        )
    choices = "'disconnect', 'drop_oldest', 'drop_newest'"
    for bad, label in [
        ("fast", "unknown"),
        ("DISCONNECT", "wrong-case"),
        (None, "None"),
        (1, "int"),
        ([], "list"),
    ]:
        yield pytest.param(
            "overflow_policy",
            bad,
            ValueError,
            f"overflow_policy must be one of {choices}, got {bad!r}",
            id=f"overflow_policy-{label}",
        )
    for name, optional in [("max_queue_bytes", False), ("max_history_bytes", True)]:
        kind = "an int or None" if optional else "an int"
        for bad, label in [("5", "str"), (True, "bool"), (1.5, "float"), (NAN, "nan")]:
            yield pytest.param(
                name, bad, TypeError, f"{name} must be {kind}, got {bad!r}", id=f"{name}-{label}"
            )
        yield pytest.param(name, 0, ValueError, f"{name} must be >= 1, got 0", id=f"{name}-zero")


@pytest.mark.parametrize(("field", "value", "error", "message"), list(_all_cases()))
def test_invalid_value_names_field_and_value(
    field: str, value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        BroadcasterConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param(
            {"memory_warning_threshold_mb": 300.0},
            "memory_critical_threshold_mb must be >= memory_warning_threshold_mb (300.0), "
            "got 200.0",
            id="critical-below-warning",
        ),
        pytest.param(
            {"memory_warning_threshold_mb": 50, "memory_critical_threshold_mb": 49.5},
            "memory_critical_threshold_mb must be >= memory_warning_threshold_mb (50), got 49.5",
            id="critical-below-warning-explicit",
        ),
        pytest.param(
            {"max_queue_bytes": 1000},
            "max_queue_bytes must be >= max_event_bytes (65536) so that every accepted "
            "event fits in a queue, got 1000",
            id="queue-bytes-below-event-bytes",
        ),
        pytest.param(
            {"max_event_bytes": 2_000_000},
            "max_queue_bytes must be >= max_event_bytes (2000000) so that every accepted "
            "event fits in a queue, got 1048576",
            id="event-bytes-above-default-queue-bytes",
        ),
        pytest.param(
            {"max_event_bytes": 1000, "max_history_bytes": 999},
            "max_history_bytes must be None or >= max_event_bytes (1000) so that history "
            "can hold an event, got 999",
            id="history-bytes-below-event-bytes",
        ),
    ],
)
def test_cross_field_rules(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        BroadcasterConfig(**changes)  # type: ignore[arg-type]


def test_broadcaster_rejects_a_config_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match=re.escape("config must be a BroadcasterConfig, got dict")):
        EventBroadcaster({"max_queue_size": 5})  # type: ignore[arg-type]


def test_broadcaster_defaults_to_the_default_config() -> None:
    assert EventBroadcaster().config == BroadcasterConfig()
