"""Ending open streams when the server is told to stop (SIGINT / SIGTERM).

uvicorn waits for every response to finish before it runs the lifespan
shutdown, so the Starlette adapter chains the server's signal handlers to end
its streams first. Nothing here imports a web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._streams import StreamRegistry

__all__ = ["install_shutdown_hook"]

_SignalHandler = Callable[[int, "FrameType | None"], Any]


class _ShutdownHook:
    """A signal handler wrapped around the server's own: it also ends open streams.

    uvicorn (0.54, h11 and httptools) does not tell streaming responses that it
    is shutting down: on SIGTERM it stops accepting, marks connections
    keep-alive=False and then waits for every response to finish, so an open
    SSE stream keeps it waiting ("Waiting for connections to close") forever,
    and the lifespan shutdown that would close the broadcaster only runs after
    that. Chaining the handler uvicorn installed for SIGINT/SIGTERM lets the
    streams end as soon as the signal arrives, with the plain ``uvicorn
    module:app`` command.
    """

    def __init__(
        self, original: _SignalHandler, schedule: Callable[[Callable[[], None]], object]
    ) -> None:
        self.original = original
        self.schedule = schedule
        self.registries: weakref.WeakSet[StreamRegistry] = weakref.WeakSet()

    def __call__(self, signum: int, frame: FrameType | None) -> Any:
        # A signal handler runs between two bytecodes of the main thread, maybe
        # inside the event loop itself: only schedule the work on the loop.
        with contextlib.suppress(RuntimeError):  # a closed loop has no stream left
            self.schedule(self._close)
        return self.original(signum, frame)

    def _close(self) -> None:
        for registry in list(self.registries):
            registry.close_all()


def _scheduler() -> Callable[[Callable[[], None]], object] | None:
    """How to run a callback on the running event loop from a signal handler."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return loop.call_soon_threadsafe
    trio: Any = sys.modules.get("trio")
    if trio is not None:
        try:
            return trio.lowlevel.current_trio_token().run_sync_soon  # type: ignore[no-any-return]
        except RuntimeError:
            pass
    return None  # pragma: no cover - neither asyncio nor trio


def install_shutdown_hook(registry: StreamRegistry) -> bool:
    """Chain the server's SIGINT/SIGTERM handlers so that they end the registry's streams.

    Only handlers a server installed (callables other than Python's default
    SIGINT handler) are wrapped: a process whose SIGTERM kills it is left as
    it is. Signals can be handled only in the main thread; elsewhere (a server
    run in a thread) nothing is done. Idempotent.

    Returns:
        True when at least one handler now ends the streams.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    hooked = False
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if isinstance(current, _ShutdownHook):
            current.registries.add(registry)
            hooked = True
            continue
        if (
            not callable(current)
            or current is signal.default_int_handler
            # trio's own KeyboardInterrupt handler: trio restores it only if it
            # is still in place when the run ends, so leave it alone.
            or getattr(current, "__module__", "").startswith("trio")
        ):
            continue
        schedule = _scheduler()
        if schedule is None:  # pragma: no cover
            return False
        hook = _ShutdownHook(current, schedule)
        hook.registries.add(registry)
        signal.signal(signum, hook)
        hooked = True
    return hooked
