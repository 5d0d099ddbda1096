from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ._metrics import MemoryMetrics

__all__ = ["Clock", "MemoryPressureHook", "OverflowPolicy", "PressureLevel"]


class OverflowPolicy(str, enum.Enum):
    """What happens when a subscriber's queue is full."""

    DISCONNECT = "disconnect"
    """End the subscription with `SlowSubscriberError` after the queued events."""
    DROP_OLDEST = "drop_oldest"
    """Discard the oldest queued events to make room, counting them in ``dropped``."""
    DROP_NEWEST = "drop_newest"
    """Discard the new event, counting it in ``dropped``."""

    def __str__(self) -> str:
        return self.value


PressureLevel = Literal["warning", "critical"]

#: A clock returns the current time in seconds since the epoch (``time.time``).
Clock = Callable[[], float]

#: ``on_memory_pressure(level, metrics)``: called when process RSS crosses a threshold.
MemoryPressureHook = Callable[[PressureLevel, "MemoryMetrics"], object]
