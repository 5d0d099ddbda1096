"""One shared client per running event loop, and closing them all from any one.

An httpx client must never be used from two event loops: its connections
belong to the loop that opened them. So the shared clients are kept per loop
(an asyncio loop, or a trio run), and a client is only ever closed on its own
loop: `aclose_shared_clients` closes the caller's directly and hands each
other loop the closing of its own, thread-safely.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx

__all__ = ["aclose_shared_clients", "get_shared_client"]

logger = logging.getLogger("sse_broadcaster")

# How often a caller waiting for another loop to close its client checks that
# the loop still runs (a loop that stopped meanwhile would never answer).
_POLL_INTERVAL = 0.1


class _Loop:
    """A running event loop that another thread can hand work to."""

    def running(self) -> bool:
        """Whether the loop runs now, so that work handed to it runs soon."""
        raise NotImplementedError

    def ended(self) -> bool:
        """Whether the loop can never run again (closed, finished or collected)."""
        raise NotImplementedError

    def call_soon(self, callback: Callable[[], object]) -> bool:
        """Run ``callback`` on the loop's thread soon (from any thread); False if it ended."""
        raise NotImplementedError

    def spawn(self, function: Callable[[], Awaitable[None]]) -> None:
        """Run ``function()`` in a task of its own; only from the loop's thread."""
        raise NotImplementedError


# Strong references to the tasks spawned on asyncio loops: asyncio keeps weak ones.
_asyncio_tasks: set[asyncio.Task[None]] = set()


class _AsyncioLoop(_Loop):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the registry's key: not kept alive from here

    def running(self) -> bool:
        loop = self._loop()
        return loop is not None and loop.is_running()

    def ended(self) -> bool:
        loop = self._loop()
        return loop is None or loop.is_closed()

    def call_soon(self, callback: Callable[[], object]) -> bool:
        loop = self._loop()
        if loop is None:
            return False
        try:
            # In a context of its own: by default the callback (and a task it
            # starts) would run in a copy of the calling thread's context,
            # where the async library in use (sniffio's variable) may be trio.
            loop.call_soon_threadsafe(callback, context=contextvars.Context())
        except RuntimeError:  # closed
            return False
        return True

    def spawn(self, function: Callable[[], Awaitable[None]]) -> None:
        async def run() -> None:
            await function()

        loop = self._loop()
        assert loop is not None  # we run on it
        # A task of the loop's own: anyio has no way to start one from outside
        # a task group (anyio.from_thread.run blocks a thread until it ends).
        task = loop.create_task(run())
        _asyncio_tasks.add(task)
        task.add_done_callback(_asyncio_tasks.discard)


class _TrioLoop(_Loop):
    def __init__(self, token: Any) -> None:
        self._token = weakref.ref(token)  # a trio.lowlevel.TrioToken

    def running(self) -> bool:
        return not self.ended()

    def ended(self) -> bool:
        return not self.call_soon(_nothing)

    def call_soon(self, callback: Callable[[], object]) -> bool:
        import trio

        token = self._token()
        if token is None:
            return False
        try:
            token.run_sync_soon(callback)
        except trio.RunFinishedError:
            return False
        return True

    def spawn(self, function: Callable[[], Awaitable[None]]) -> None:
        import trio

        # A system task: it belongs to the run, not to a nursery of the caller's.
        trio.lowlevel.spawn_system_task(function)


def _nothing() -> None:
    pass


def _running_loop() -> object:
    """The running asyncio loop or trio run token of this thread.

    Raises:
        RuntimeError: neither an asyncio loop nor trio runs in this thread.
    """
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    if "trio" in sys.modules:  # never import trio for an asyncio program
        import trio

        try:
            return trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
    raise RuntimeError("no event loop (asyncio or trio) is running in this thread")


def _wrap(key: object) -> _Loop:
    if isinstance(key, asyncio.AbstractEventLoop):
        return _AsyncioLoop(key)
    return _TrioLoop(key)


class _Shared:
    __slots__ = ("client", "loop")

    def __init__(self, client: httpx.AsyncClient, loop: _Loop) -> None:
        self.client = client
        self.loop = loop


# Keyed by the asyncio loop or trio token: a loop that is garbage collected
# takes its entry with it. Changed under the lock (from any thread); read
# without it in get_shared_client's fast path.
_clients: weakref.WeakKeyDictionary[object, _Shared] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def get_shared_client(create: Callable[[], httpx.AsyncClient]) -> httpx.AsyncClient:
    """The running loop's shared client; a new one from ``create()`` if it has none open.

    Raises:
        RuntimeError: no event loop is running in this thread.
    """
    key = _running_loop()
    shared = _clients.get(key)
    if shared is not None and not shared.client.is_closed:
        return shared.client
    with _lock:
        shared = _clients.get(key)
        if shared is None or shared.client.is_closed:
            for other, entry in list(_clients.items()):
                if entry.loop.ended():  # nothing can close its client any more
                    del _clients[other]
            shared = _clients[key] = _Shared(create(), _wrap(key))
        return shared.client


class _RemoteClose:
    """Closes a client on its own loop and wakes the caller, on another loop, when done."""

    def __init__(self, client: httpx.AsyncClient, caller: _Loop) -> None:
        self._client = client
        self._caller = caller
        self._done = anyio.Event()  # of the caller's loop
        self.finished = False
        self.error: Exception | None = None

    def start(self, target: _Loop) -> bool:
        """Hand the closing to ``target`` (any thread); False if that loop has ended."""

        def begin() -> None:  # on the target loop
            try:
                target.spawn(self._run)
            except Exception as exc:  # the loop is shutting down
                self._finish(exc)

        return target.call_soon(begin)

    async def _run(self) -> None:  # on the target loop
        error = None
        try:
            with anyio.CancelScope(shield=True):
                await self._client.aclose()
        except Exception as exc:
            error = exc
        finally:
            self._finish(error)

    def _finish(self, error: Exception | None) -> None:
        self.error = error
        self.finished = True
        self._caller.call_soon(self._done.set)  # False if the caller's loop has ended

    async def wait(self, target: _Loop) -> None:
        """Until the client is closed, or ``target`` stops before closing it."""
        while not self.finished:
            with anyio.move_on_after(_POLL_INTERVAL):
                await self._done.wait()
            if not self.finished and not target.running():
                return  # it closes the client if it runs again


async def aclose_shared_clients() -> None:
    """Close the shared client of every event loop (see `aclose_http_clients`)."""
    key = _running_loop()
    caller = _wrap(key)
    others: list[_Shared] = []
    with _lock:
        own = _clients.pop(key, None)
        for other, entry in list(_clients.items()):
            if entry.loop.ended():
                del _clients[other]  # nothing can close it any more
            elif entry.loop.running():
                del _clients[other]
                others.append(entry)
            # else: an asyncio loop that exists but does not run now (between two
            # run_until_complete calls): nothing can run on it, so it keeps its
            # client, which the next call made while it runs will close.
    closes: list[tuple[_RemoteClose, _Loop]] = []
    for entry in others:
        close = _RemoteClose(entry.client, caller)
        if close.start(entry.loop):
            closes.append((close, entry.loop))
    errors: list[Exception] = []
    if own is not None:
        try:
            with anyio.CancelScope(shield=True):
                await own.client.aclose()
        except Exception as exc:
            errors.append(exc)
    for close, target in closes:
        await close.wait(target)
        if close.error is not None:
            errors.append(close.error)
    for error in errors[1:]:
        logger.error("closing a shared HTTP client failed", exc_info=error)
    if errors:
        raise errors[0]
