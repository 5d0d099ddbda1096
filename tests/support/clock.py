"""`FakeClock`: the injectable clock of `EventBroadcaster(clock=...)` and the DNS cache."""

from __future__ import annotations


class FakeClock:
    """A wall clock that moves only when a test moves it."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
