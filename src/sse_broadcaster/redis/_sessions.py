"""The sessions this process follows, and what the Pub/Sub reader and recovery share.

`Sessions` holds, per followed session, a `Live`: its channel, its delivery
cursor and the messages buffered while its stream is read; and the current
Pub/Sub connection (`Link`), on which following a session subscribes to its
channel and dropping it unsubscribes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from .._errors import SessionLimitError
from ..backends._base import BackendHub
from ._scripts import NO_KEY, Key, decode_message

__all__ = ["Link", "Live", "Sessions"]

logger = logging.getLogger("sse_broadcaster")

_PENDING_OVERHEAD = 200  # counted per buffered message on top of its payload


class Live:
    """This process's following of one session: its channel and delivery cursor.

    ``cursor`` is the last id handed to `BackendHub.deliver` (None until the first
    attach has read the stream's last id; "" when the stream did not exist). Live
    messages at or below it are dropped, so attaches and recoveries, which read the
    stream up to it, hand over with no duplicate and no hole. While ``hold`` or
    ``recovering`` is set the reader buffers messages in ``pending`` instead, raw
    (decoded when flushed), bounded by count and bytes. Past a bound the buffer is
    dropped and ``overflowed`` set: incoming messages are dropped too until the
    next read of the stream from the cursor, which covers them (see
    `Sessions.buffer`).
    """

    __slots__ = (
        "attaching",
        "channel",
        "close_seen",
        "closed",
        "confirmed",
        "cursor",
        "cursor_key",
        "dead",
        "hold",
        "key",
        "lock",
        "overflowed",
        "pending",
        "pending_bytes",
        "recovering",
        "rounds",
        "session_id",
    )

    def __init__(self, session_id: str, key: str, channel: bytes) -> None:
        self.session_id = session_id
        self.key = key
        self.channel = channel
        self.cursor: str | None = None
        self.cursor_key: Key = NO_KEY
        self.confirmed = -1  # connection generation whose SUBSCRIBE was confirmed
        self.recovering = False
        self.hold = 0
        self.attaching = 0
        # (key, payload) per buffered message; payload None stands for a close.
        self.pending: list[tuple[Key, bytes | None]] = []
        self.pending_bytes = 0
        self.overflowed = False  # the buffer was dropped: a read from the cursor is due
        self.close_seen = False  # a close arrived while overflowed
        # Set when this process stops following the session; close_session waits on it.
        self.closed: anyio.Event | None = None
        self.rounds = 0  # reads in a row that overflowed
        self.lock = anyio.Lock()
        self.dead = False


class Link:
    """One Pub/Sub connection's state, alive between connect and loss."""

    __slots__ = ("conn", "expected", "generation", "last_rx", "outbox", "recover", "wakeup")

    def __init__(self, conn: AbstractConnection, generation: int) -> None:
        self.conn = conn
        self.generation = generation
        self.outbox: list[tuple[Any, ...]] = []
        self.wakeup = anyio.Event()
        self.expected: dict[bytes, int] = {}  # channel -> SUBSCRIBE replies still due
        self.recover: list[Live] = []
        self.last_rx = time.monotonic()

    def send(self, *command: Any) -> None:
        self.outbox.append(command)
        self.wakeup.set()

    def subscribe(self, live: Live) -> None:
        self.expected[live.channel] = self.expected.get(live.channel, 0) + 1
        self.send("SUBSCRIBE", live.channel)

    async def write_loop(self, fail: Callable[[BaseException], None]) -> None:
        conn = self.conn
        try:
            while True:
                if not self.outbox:
                    self.wakeup = anyio.Event()
                    await self.wakeup.wait()
                    continue
                commands, self.outbox = self.outbox, []
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        except (RedisError, OSError) as exc:
            fail(exc)

    async def health_loop(self, interval: float, fail: Callable[[BaseException], None]) -> None:
        while True:
            await anyio.sleep(interval)
            idle = time.monotonic() - self.last_rx
            if idle >= 3 * interval:
                fail(ConnectionError(f"no reply from Redis for {idle:.1f} s"))
                return
            if idle >= interval:
                self.send("PING")


class Sessions:
    """The followed sessions by id and by channel, their buffers, and the current link.

    Its counters (``pending_total``, ``pending_bytes``, ``duplicates``,
    ``overflows``) are figures of `RedisBackend.stats`.
    """

    def __init__(
        self,
        *,
        stream_prefix: str,
        channel_prefix: str,
        max_buffered_messages: int,
        max_buffered_bytes: int,
    ) -> None:
        self._stream_prefix = stream_prefix
        self._channel_prefix = channel_prefix
        self._max_buffered_messages = max_buffered_messages
        self._max_buffered_bytes = max_buffered_bytes
        self.sessions: dict[str, Live] = {}
        self.channels: dict[bytes, Live] = {}
        self.link: Link | None = None  # the Pub/Sub connection, None while there is none
        self._changed: anyio.Event | None = None
        self.pending_total = 0  # messages buffered across sessions
        self.pending_bytes = 0  # their bytes, with _PENDING_OVERHEAD each
        self.duplicates = 0
        self.overflows = 0

    def clear(self) -> None:
        self.sessions.clear()
        self.channels.clear()

    def notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def wait_changed(self) -> None:
        """Wait until the connection, a subscription or a session changes state."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def deliver(self, hub: BackendHub, live: Live, key: Key, payload: bytes) -> None:
        """Hand the message's event to the hub unless the cursor is at or past it."""
        if key > live.cursor_key:
            event = decode_message(live.session_id, payload)
            live.cursor_key = key
            live.cursor = event.id
            hub.deliver(live.session_id, event)
        else:
            self.duplicates += 1

    # -- the buffer of messages that arrive while a stream is read -----------------------

    def buffer(self, live: Live, key: Key, payload: bytes | None) -> None:
        """Keep a message that arrived while the session's stream is being read.

        Bounded per session by ``max_buffered_messages`` and across sessions by
        ``max_buffered_bytes``. Past a bound the session's
        buffer is dropped and ``overflowed`` set: messages are dropped until the
        next read of the stream from the cursor, which is sent after they arrived
        and so covers them. A close is remembered as a flag meanwhile.
        """
        if live.overflowed:
            if payload is None:
                live.close_seen = True
            return
        size = _PENDING_OVERHEAD + (0 if payload is None else len(payload))
        if (
            len(live.pending) >= self._max_buffered_messages
            or self.pending_bytes + size > self._max_buffered_bytes
        ):
            if payload is None:
                live.close_seen = True
            self._overflow(live)
            return
        live.pending.append((key, payload))
        live.pending_bytes += size
        self.pending_total += 1
        self.pending_bytes += size

    def _overflow(self, live: Live) -> None:
        self.overflows += 1
        if not live.overflowed:
            logger.info(
                "session %r: more than the buffer holds arrived while its stream was read "
                "(%d messages); reading it again from %r",
                live.session_id,
                len(live.pending),
                live.cursor,
            )
        live.overflowed = True
        self.clear_pending(live)

    def clear_pending(self, live: Live) -> None:
        self.pending_total -= len(live.pending)
        self.pending_bytes -= live.pending_bytes
        live.pending = []
        live.pending_bytes = 0

    def reread(self, live: Live) -> None:
        """The buffer overflowed during a read: read the stream again from the cursor."""
        live.recovering = True
        link = self.link
        if link is not None and live.confirmed == link.generation:
            link.recover.append(live)
            self.notify()
        # else: the connection is gone; the resubscription queues the recovery.

    def flush(self, hub: BackendHub, live: Live) -> None:
        """Deliver what the reader buffered while the session was held, dropping ids seen."""
        if live.hold or live.recovering or live.overflowed or not live.pending:
            return
        pending = live.pending
        self.clear_pending(live)
        for key, payload in pending:
            if payload is None:
                self.closed_remotely(hub, live)
                return
            if live.cursor is not None:
                self.deliver(hub, live, key, payload)

    # -- following and dropping sessions -------------------------------------------------

    def follow(self, hub: BackendHub, session_id: str) -> Live:
        """The session's `Live`, subscribing to its channel if it is not followed yet.

        Raises:
            SessionLimitError: this process already follows ``max_sessions`` sessions.
        """
        live = self.sessions.get(session_id)
        if live is not None:
            return live
        limit = hub.config.max_sessions
        if limit is not None and len(self.sessions) >= limit:
            raise SessionLimitError(
                f"cannot follow session {session_id!r}: this process follows "
                f"max_sessions={limit} sessions"
            )
        live = Live(
            session_id,
            self._stream_prefix + session_id,
            (self._channel_prefix + session_id).encode(),
        )
        self.sessions[session_id] = live
        self.channels[live.channel] = live
        if self.link is not None:
            self.link.subscribe(live)
        return live

    def closed_remotely(self, hub: BackendHub, live: Live) -> None:
        hub.end_session(live.session_id)
        self.drop(live)

    def drop(self, live: Live) -> None:
        """Stop following the session (its local subscriptions are gone or ended)."""
        if live.dead:
            return
        live.dead = True
        if live.closed is not None:
            live.closed.set()
        self.clear_pending(live)
        if self.sessions.get(live.session_id) is live:
            del self.sessions[live.session_id]
            del self.channels[live.channel]
            link = self.link
            if link is not None:
                link.send("UNSUBSCRIBE", live.channel)
        self.notify()

    async def wait_closed(self, session_id: str, within: float) -> None:
        """After this process closed the session: deliver up to its close message, drop it.

        The close message travels on the session's channel behind every event
        published before it: waiting for it (bounded) lets this process's
        subscribers get those events before their stream ends, as elsewhere.
        """
        live = self.sessions.get(session_id)
        if live is not None and not live.attaching and not live.dead:
            live.closed = anyio.Event()
            with anyio.move_on_after(within):
                await live.closed.wait()
            self.drop(live)
