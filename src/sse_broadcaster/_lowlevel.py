"""Parking a consumer task until a producer wakes it: the hot path of fan-out.

A fresh `anyio.Event` per wait costs more than the delivery itself, so each
supported event loop gets a parker built on its own primitive: an asyncio
future, or trio's `wait_task_rescheduled`. Any other loop falls back to
`anyio.Event`. The public API stays anyio; only this module knows the loops.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import anyio

__all__ = ["Parker", "make_parker"]


class Parker:
    """Parks one task at a time; `unpark` is safe to call when nobody waits."""

    __slots__ = ()

    async def park(self) -> None:
        raise NotImplementedError

    def unpark(self) -> None:
        raise NotImplementedError


class _AsyncioParker(Parker):
    __slots__ = ("_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] | None = None

    async def park(self) -> None:
        future = self._future = self._loop.create_future()
        try:
            await future
        finally:
            self._future = None

    def unpark(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)


class _TrioParker(Parker):
    __slots__ = ("_task", "_trio")

    def __init__(self, trio: Any) -> None:
        self._trio = trio
        self._task: Any = None

    async def park(self) -> None:
        lowlevel = self._trio.lowlevel
        self._task = lowlevel.current_task()

        def abort(_: object) -> Any:
            self._task = None
            return lowlevel.Abort.SUCCEEDED

        await lowlevel.wait_task_rescheduled(abort)

    def unpark(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            self._trio.lowlevel.reschedule(task)


class _AnyioParker(Parker):
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    async def park(self) -> None:
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
        return _AsyncioParker(loop)
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return _TrioParker(trio)
    return _AnyioParker()  # pragma: no cover - neither asyncio nor trio
