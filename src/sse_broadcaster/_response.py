"""What every ``EventSourceResponse`` shares, whatever the framework: one stream's life.

`StreamCore` checks the options, enters the source (a `Subscription`, a
`MultiSubscription` through `_sources.MultiSource`, or a request's own async
iterable through `_sources.IterableSource`), says what the
stream opens with (``retry:``, the ``gap`` event, the replay) or that the
client must come back later, runs `_streams.run_stream`, and closes the
source at the end. The ASGI and aiohttp responses only add their transport:
how to write, how to tell the client left, how to abort a connection. Nothing
here imports a web framework.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import anyio

from ._adapter import (
    COME_BACK_LATER,
    SSE_HEADERS,
    LastEventId,
    come_back_later,
    multi_prelude,
    parse_last_event_id,
    prelude,
    retry_field,
)
from ._event import encode_comment
from ._multi import _NEW as _MULTI_NEW
from ._multi import MultiSubscription
from ._shutdown import install_shutdown_hook
from ._sources import EventItem, IterableSource, MultiSource
from ._streams import (
    Outcome,
    StreamRegistry,
    StreamSource,
    check_flush_window,
    default_registry,
    registry_of_owner,
    run_stream,
)
from ._subscription import _NEW, Subscription
from ._validation import check_int, check_positive

if TYPE_CHECKING:
    from ._config import BroadcasterConfig

__all__ = [
    "ComeBackLater",
    "ResponseSource",
    "StreamCore",
    "check_status",
    "come_back_later_headers",
]

#: What an ``EventSourceResponse`` streams: a subscription, a subscription to
#: several sessions, or an async iterable of `Event` objects, dicts (``data``,
#: ``event``, ``id``, ``retry``, ``comment``) or strings (the data of an
#: unnamed event).
ResponseSource = Subscription | MultiSubscription | AsyncIterable[EventItem]

#: Keep-alive and send timeout of a stream that follows no broadcaster.
DEFAULT_PING = 15.0
DEFAULT_SEND_TIMEOUT = 5.0


class ComeBackLater(Exception):
    """The stream cannot open now: answer `body` with ``Retry-After: retry_after``."""

    def __init__(self, body: bytes, retry_after: int) -> None:
        super().__init__(body, retry_after)
        self.body = body
        self.retry_after = retry_after


def check_status(status: int) -> int:
    """`status` if a stream may answer with it (200..599), else a TypeError / ValueError."""
    if isinstance(status, bool) or not isinstance(status, int):
        raise TypeError(f"status must be an int, got {status!r}")
    if not 200 <= status <= 599:
        raise ValueError(f"status must be in 200..599, got {status!r}")
    return status


def _check_headers(headers: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """The stream's response headers: the SSE ones, then the caller's (which win)."""
    extra: list[tuple[str, str]] = []
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"headers must map str to str, got {name!r}: {value!r}")
        # A CR or LF would split the header block (response splitting).
        if not name or any(c in name for c in "\r\n\0:") or any(c in value for c in "\r\n\0"):
            raise ValueError(f"header {name!r} cannot be sent: {name!r}: {value!r}")
        extra.append((name, value))
    given = {name.lower() for name, _ in extra}
    return [(n, v) for n, v in SSE_HEADERS if n.lower() not in given] + extra


class StreamCore:
    """One response's stream: options, source and life cycle (see the module docstring)."""

    __slots__ = (
        "_iterable",
        "_multi",
        "_ping",
        "_retry",
        "_send_timeout",
        "_subscription",
        "_used",
        "flush_window",
        "headers",
        "last_event_id",
        "ping_comment",
        "registry",
    )

    def __init__(
        self,
        source: ResponseSource,
        *,
        headers: Mapping[str, str] | None,
        ping: float | None,
        ping_comment: str,
        send_timeout: float | None,
        retry: int | None,
        flush_window: float,
    ) -> None:
        check_positive("ping", ping, optional=True)
        check_positive("send_timeout", send_timeout, optional=True)
        check_int("retry", retry, 0, optional=True)
        if not isinstance(ping_comment, str):
            raise TypeError(f"ping_comment must be a str, got {ping_comment!r}")
        self.ping_comment = encode_comment(ping_comment)  # ValueError for CR, LF, NUL
        self.flush_window = check_flush_window(flush_window)
        self.headers = _check_headers(headers)
        self._ping = ping
        self._send_timeout = send_timeout
        self._retry = retry
        self._subscription: Subscription | None = None
        self._iterable: IterableSource | None = None
        self._multi: MultiSource | None = None
        if isinstance(source, Subscription):
            self._subscription = source
            self.registry: StreamRegistry = registry_of_owner(source._owner)
        elif isinstance(source, MultiSubscription):
            self._multi = MultiSource(source)
            self.registry = registry_of_owner(source._subs[0]._owner)
        else:
            self._iterable = IterableSource(source)  # TypeError for anything else
            self.registry = default_registry()
        self.last_event_id: LastEventId | None = None
        """Set by the adapters: the client's resume position, for the ``gap`` event."""
        self._used = False

    def _config(self) -> BroadcasterConfig | None:
        if self._subscription is not None:
            return self._subscription._owner.config
        if self._multi is not None:
            return self._multi.multi._subs[0]._owner.config
        return None

    @property
    def keepalive(self) -> float:
        """Seconds of silence after which the ping comment is sent."""
        if self._ping is not None:
            return self._ping
        config = self._config()
        return config.keepalive_interval if config is not None else DEFAULT_PING

    @property
    def send_timeout(self) -> float:
        """Seconds a write may wait for the client's socket before the client is dropped."""
        if self._send_timeout is not None:
            return self._send_timeout
        config = self._config()
        return config.send_timeout if config is not None else DEFAULT_SEND_TIMEOUT

    async def open(self) -> bytes:
        """Enter the source; what the stream opens with (``retry:``, ``gap``, replay).

        Raises:
            ComeBackLater: a limit was reached or the server is shutting down.
            RuntimeError: the response was already sent.
        """
        if self._used:
            raise RuntimeError("an EventSourceResponse can be sent only once")
        self._used = True
        registry = self.registry
        install_shutdown_hook(registry)
        if self._multi is not None:
            return await self._open_multi(self._multi)
        subscription = self._subscription
        if subscription is None:
            return retry_field(self._retry)
        config = subscription._owner.config
        if subscription._state == _NEW:  # entered here; else the caller did
            try:
                if registry.closing:
                    reason = "the server is shutting down"
                else:
                    await subscription.__aenter__()
                    reason = ""
            except COME_BACK_LATER as exc:
                reason = str(exc)
            if reason:
                subscription.close()
                raise ComeBackLater(*come_back_later(config, reason))
        # Made by the caller from a header it read itself: the gap event echoes
        # it capped, and flags one that cannot be an id.
        last_event_id = self.last_event_id or parse_last_event_id(subscription.last_event_id, None)
        retry = self._retry if self._retry is not None else config.retry_ms
        return prelude(retry, subscription, last_event_id)

    async def _open_multi(self, source: MultiSource) -> bytes:
        multi = source.multi
        config = self._config()
        assert config is not None
        if multi._state == _MULTI_NEW:  # entered here; else the caller did
            try:
                if self.registry.closing:
                    reason = "the server is shutting down"
                else:
                    await multi.__aenter__()
                    reason = ""
            except COME_BACK_LATER as exc:
                reason = str(exc)
            if reason:
                multi.close()
                raise ComeBackLater(*come_back_later(config, reason))
        source.start()
        retry = self._retry if self._retry is not None else config.retry_ms
        parts = multi_prelude(retry, multi, self.last_event_id)
        replay = source.drain_nowait()
        if replay:
            parts.extend(event.encode() for event in replay)
        else:
            # An id-only message sets the client's Last-Event-ID without an event:
            # a session quiet until the client reconnects replays what it missed.
            parts.append(f"id: {source.cursor()}\n\n".encode())
        return b"".join(parts)

    async def run(
        self,
        write: Callable[[bytes], Awaitable[None]],
        *,
        first: bytes,
        listen: Callable[[], Awaitable[None]] | None = None,
        disconnected: Callable[[], bool] | None = None,
    ) -> Outcome:
        """Stream until one side ends (see `run_stream`); the source is closed after."""

        async def stream(source: StreamSource, flush_window: float) -> Outcome:
            return await run_stream(
                source,
                write,
                keepalive=self.keepalive,
                send_timeout=self.send_timeout,
                registry=self.registry,
                ping=self.ping_comment,
                first=first,
                listen=listen,
                disconnected=disconnected,
                flush_window=flush_window,
            )

        try:
            if self._subscription is not None:
                return await stream(self._subscription, self.flush_window)
            if self._multi is not None:
                # The flush gate is the stream's own (see MultiSource.session_id).
                return await stream(self._multi, self.flush_window)
            source = self._iterable
            assert source is not None
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(source.feed)
                try:
                    outcome = await stream(source, 0)  # no session: no flush window to share
                finally:
                    task_group.cancel_scope.cancel()
            return outcome
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the source (idempotent): the subscription leaves, the generator is closed."""
        if self._subscription is not None:
            await self._subscription.aclose()
        elif self._multi is not None:
            await self._multi.aclose()
        elif self._iterable is not None:
            await self._iterable.aclose()


def come_back_later_headers(retry_after: int, length: int) -> list[tuple[str, str]]:
    """The headers of a come-back-later answer."""
    return [*SSE_HEADERS, ("Retry-After", str(retry_after)), ("Content-Length", str(length))]
