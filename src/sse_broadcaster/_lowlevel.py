"""Parking a consumer task until a producer wakes it: the hot path of fan-out.

A fresh `anyio.Event` per wait costs more than the delivery itself, so each
supported event loop gets a parker built on its own primitive: an asyncio
future, or trio's `wait_task_rescheduled`. Any other loop falls back to
`anyio.Event`. The same goes for the adapters' one watchdog timer
(`start_ticker`). The public API stays anyio; only this module knows the loops.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

__all__ = ["Parker", "current_loop_token", "make_parker", "start_ticker"]

logger = logging.getLogger("sse_broadcaster")

_Future = asyncio.Future
_base_create_future = asyncio.BaseEventLoop.create_future


class Parker:
    """Parks one task at a time; `unpark` is safe to call when nobody waits.

    ``park()`` returns what to await (``await parker.park()``), not a coroutine
    of its own: on asyncio that is the future itself, one frame less per wake-up.
    """

    __slots__ = ()

    def park(self) -> Awaitable[None]:
        raise NotImplementedError

    def unpark(self) -> None:
        raise NotImplementedError


class _AsyncioParker(Parker):
    __slots__ = ("_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] | None = None

    def park(self) -> Awaitable[None]:
        # The future stays here once done (or cancelled): unpark skips it.
        future = self._future = self._loop.create_future()
        return future

    def unpark(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)


class _BaseLoopParker(_AsyncioParker):
    """For asyncio's own loops, whose ``create_future`` is ``Future(loop=self)``
    in Python: the same future without that frame (a tenth of a paced wake-up)."""

    __slots__ = ()

    def park(self) -> Awaitable[None]:
        future = self._future = _Future(loop=self._loop)
        return future


class _TrioParker(Parker):
    __slots__ = ("_task", "_trio")

    def __init__(self, trio: Any) -> None:
        self._trio = trio
        self._task: Any = None

    def park(self) -> Awaitable[None]:
        lowlevel = self._trio.lowlevel
        self._task = lowlevel.current_task()

        def abort(_: object) -> Any:
            self._task = None
            return lowlevel.Abort.SUCCEEDED

        wait: Awaitable[None] = lowlevel.wait_task_rescheduled(abort)
        return wait

    def unpark(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            self._trio.lowlevel.reschedule(task)


class _AnyioParker(Parker):
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def park(self) -> Awaitable[None]:
        return self._park()

    async def _park(self) -> None:
        event = self._event = anyio.Event()
        try:
            await event.wait()
        finally:
            self._event = None

    def unpark(self) -> None:
        if self._event is not None:
            self._event.set()


def make_parker() -> Parker:
    """A parker for the event loop running in this thread."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        if type(loop).create_future is _base_create_future:
            return _BaseLoopParker(loop)
        return _AsyncioParker(loop)  # uvloop's, or another loop's own futures
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return _TrioParker(trio)
    return _AnyioParker()  # pragma: no cover - neither asyncio nor trio


def start_ticker(interval: float, tick: Callable[[], bool]) -> None:
    """Call ``tick()`` every `interval` seconds on the running event loop until it returns False.

    One timer for many streams (the adapters' watchdog): on asyncio a chain of
    ``call_later`` callbacks, on trio a system task, so that no request's task
    has to host it. An exception from ``tick`` is logged and the ticking goes on.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:

        def fire() -> None:
            if _safe(tick):
                loop.call_later(interval, fire)

        loop.call_later(interval, fire)
        return
    trio: Any = sys.modules["trio"]

    async def run() -> None:
        while True:
            await trio.sleep(interval)
            if not _safe(tick):
                return

    trio.lowlevel.spawn_system_task(run, name="sse_broadcaster ticker")


def current_loop_token() -> object:
    """The running event loop (asyncio) or trio token: which loop a ticker runs on."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return sys.modules["trio"].lowlevel.current_trio_token()


def _safe(tick: Callable[[], bool]) -> bool:
    try:
        return tick()
    except Exception:  # pragma: no cover - a bug in tick; keep the other streams watched
        logger.exception("sse_broadcaster: the stream watchdog failed")
        return True
