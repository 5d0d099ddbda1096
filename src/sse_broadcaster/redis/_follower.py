"""This process's following of sessions: the Pub/Sub connection and recovery.

One `Follower` keeps, per session with local subscribers, a channel
subscription and a delivery cursor. It hands live messages to
`BackendHub.deliver`, hands subscribers over from a stream read to live
delivery with no duplicate and no hole (`Follower.attach`), and after a lost
connection resubscribes and reads each session's stream from its cursor.
It reads streams through the callables it is given, never through the backend.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

from .._errors import BackendUnavailableError, BroadcasterClosedError, GapError, SessionLimitError
from ..backends._base import BackendHub, Replay
from ._frames import frame_reader, stream_of
from ._scripts import (
    CLOSE,
    NO_KEY,
    Key,
    decode_entries,
    decode_message,
    key_of,
    message_key,
    parse_id,
)

__all__ = ["Follower", "Live", "ReadStream", "ReadStreams"]

logger = logging.getLogger("sse_broadcaster")

_PENDING_OVERHEAD = 200  # counted per buffered message on top of its payload
# Sessions whose streams one pipelined round trip of a recovery reads.
_RECOVERY_BATCH = 200
# Reads in a row of one session whose buffer overflowed meanwhile before giving up.
_MAX_ROUNDS = 8

ReadStream = Callable[[str, str, str], Awaitable[tuple[str, bool, Sequence[Any]]]]
"""(key, after, upto) -> the stream's last id, gap, entries (the read script)."""
ReadStreams = Callable[[Sequence[tuple[str, str]]], Awaitable[Sequence[Any]]]
"""[(key, after)] -> each stream's [last, gap, entries] after it, in one round trip."""


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
    `Follower.buffer`).
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


class Follower:
    """The followed sessions and the Pub/Sub connection that feeds them.

    `run` owns the connection: it reconnects with backoff after a loss,
    resubscribes, waits for the confirmations, then reads each followed
    session's stream from its cursor (`ReadStreams`), so no acknowledged event
    is lost while history holds it; if that history is gone, the session's
    local subscriptions end with `GapError`. Its public attributes are the
    figures of `RedisBackend.stats`.
    """

    def __init__(
        self,
        *,
        stream_prefix: str,
        channel_prefix: str,
        health_interval: float,
        min_backoff: float,
        max_backoff: float,
        max_buffered_messages: int,
        max_buffered_bytes: int,
    ) -> None:
        self._stream_prefix = stream_prefix
        self._channel_prefix = channel_prefix
        self._health_interval = health_interval
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._max_buffered_messages = max_buffered_messages
        self._max_buffered_bytes = max_buffered_bytes
        self._read_many: ReadStreams | None = None
        self._channels: dict[bytes, Live] = {}
        self._link: Link | None = None
        self._generation = 0
        self._changed: anyio.Event | None = None
        self.closed = False
        self.sessions: dict[str, Live] = {}
        self.pending_total = 0  # messages buffered across sessions
        self.pending_bytes = 0  # their bytes, with _PENDING_OVERHEAD each
        # figures for stats()
        self.connected = False
        self.ever_connected = False
        self.reconnects = 0
        self.recovered = 0
        self.live_gaps = 0
        self.received = 0
        self.duplicates = 0
        self.overflows = 0
        self.recovery_started: float | None = None
        self.last_recovery: float | None = None
        self.last_error: str | None = None

    def close(self) -> None:
        """Stop: waiting attaches raise `BroadcasterClosedError`, `run` ends its loop."""
        self.closed = True
        self.notify()

    def clear(self) -> None:
        self.sessions.clear()
        self._channels.clear()

    def notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def wait_changed(self) -> None:
        """Wait until the connection, a subscription or a session changes state."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    # -- the Pub/Sub connection ----------------------------------------------------------

    async def run(
        self, hub: BackendHub, connect: Callable[[], AbstractConnection], read_many: ReadStreams
    ) -> None:
        """Follow Redis until cancelled, reconnecting with jittered exponential backoff."""
        self._read_many = read_many
        delay = self._min_backoff
        while not self.closed:
            conn: AbstractConnection | None = None
            try:
                conn = connect()
                try:
                    await conn.connect()  # type: ignore[no-untyped-call]
                except (RedisError, OSError) as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                else:
                    delay = self._min_backoff
                    await self._serve(hub, conn)
            except Exception as exc:
                logger.exception("the Redis reader failed; reconnecting")
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self._lost()
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await conn.disconnect(nowait=True)
            await anyio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._max_backoff)

    def _lost(self) -> None:
        if self._link is None:
            return
        self._link = None
        self.connected = False
        for live in self.sessions.values():
            live.confirmed = -1
            if live.cursor is not None:
                live.recovering = True
        if not self.closed:
            logger.warning("lost the Redis Pub/Sub connection (%s); reconnecting", self.last_error)
        self.notify()

    async def _serve(self, hub: BackendHub, conn: AbstractConnection) -> None:
        self._generation += 1
        link = Link(conn, self._generation)
        if self.ever_connected:
            self.reconnects += 1
            if self.sessions:
                self.recovery_started = time.monotonic()
            logger.info("reconnected to Redis; resubscribing %d sessions", len(self.sessions))
        self.ever_connected = True
        self._link = link
        for live in self.sessions.values():
            link.subscribe(live)
        self.connected = True
        self.notify()
        failure: list[BaseException] = []
        async with anyio.create_task_group() as tg:

            def fail(exc: BaseException) -> None:
                failure.append(exc)
                tg.cancel_scope.cancel()

            tg.start_soon(self._read_loop, hub, link, fail)
            tg.start_soon(link.write_loop, fail)
            tg.start_soon(link.health_loop, self._health_interval, fail)
            tg.start_soon(self._recover_loop, hub, link, fail)
        if failure:
            exc = failure[0]
            self.last_error = f"{type(exc).__name__}: {exc}"

    async def _read_loop(
        self, hub: BackendHub, link: Link, fail: Callable[[BaseException], None]
    ) -> None:
        conn = link.conn
        # Pub/Sub traffic is parsed here in batches, from the connection's stream:
        # one read of up to 64 KB, then every complete message in it, with no await
        # per message or per line as redis-py's reply path has. Its own reader is
        # the fallback where the stream is not reachable (another connection class).
        stream = stream_of(conn)
        try:
            if stream is not None:
                frames = frame_reader()
                while True:
                    data = await stream.read(65536)
                    if not data:
                        raise ConnectionError("Connection closed by server.")
                    link.last_rx = time.monotonic()
                    frames.feed(data)
                    while (response := frames.gets()) is not False:
                        self._on_response(hub, link, response)
            else:
                while True:
                    response = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
                    link.last_rx = time.monotonic()
                    self._on_response(hub, link, response)
        except (RedisError, OSError) as exc:
            fail(exc)

    def _on_response(self, hub: BackendHub, link: Link, response: Any) -> None:
        if isinstance(response, ResponseError):
            raise response
        if not isinstance(response, list) or not response:
            return  # +PONG outside subscribed mode
        kind = response[0]
        if kind == b"message":
            self.received += 1
            live = self._channels.get(response[1])
            if live is not None:
                try:
                    self._on_message(hub, live, response[2])
                except (ValueError, IndexError) as exc:
                    logger.warning("dropped a malformed message on %r: %s", response[1], exc)
        elif kind == b"subscribe":
            self._on_subscribed(link, response[1])

    def _on_message(self, hub: BackendHub, live: Live, payload: bytes) -> None:
        if payload == CLOSE:
            if live.hold or live.recovering:
                self.buffer(live, NO_KEY, None)
            else:
                self._closed_remotely(hub, live)
            return
        key = message_key(payload)
        if live.hold or live.recovering:
            self.buffer(live, key, payload)
        elif live.cursor is None:
            return  # nobody attached yet, or leaving
        elif key > live.cursor_key:
            event = decode_message(live.session_id, payload)
            live.cursor_key = key
            live.cursor = event.id
            hub.deliver(live.session_id, event)
        else:
            self.duplicates += 1

    def _on_subscribed(self, link: Link, channel: bytes) -> None:
        due = link.expected.get(channel, 0) - 1
        if due > 0:
            link.expected[channel] = due
            return
        link.expected.pop(channel, None)
        live = self._channels.get(channel)
        if live is None:
            return
        live.confirmed = link.generation
        if live.recovering:
            link.recover.append(live)
        self.notify()

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
        self._clear_pending(live)

    def _clear_pending(self, live: Live) -> None:
        self.pending_total -= len(live.pending)
        self.pending_bytes -= live.pending_bytes
        live.pending = []
        live.pending_bytes = 0

    def _reread(self, live: Live) -> None:
        """The buffer overflowed during a read: read the stream again from the cursor."""
        live.recovering = True
        link = self._link
        if link is not None and live.confirmed == link.generation:
            link.recover.append(live)
            self.notify()
        # else: the connection is gone; the resubscription queues the recovery.

    def _flush(self, hub: BackendHub, live: Live) -> None:
        """Deliver what the reader buffered while the session was held, dropping ids seen."""
        if live.hold or live.recovering or live.overflowed or not live.pending:
            return
        pending = live.pending
        self._clear_pending(live)
        session_id = live.session_id
        for key, payload in pending:
            if payload is None:
                self._closed_remotely(hub, live)
                return
            if live.cursor is None:
                continue
            if key > live.cursor_key:
                event = decode_message(session_id, payload)
                live.cursor_key = key
                live.cursor = event.id
                hub.deliver(session_id, event)
            else:
                self.duplicates += 1

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
        self._channels[live.channel] = live
        if self._link is not None:
            self._link.subscribe(live)
        return live

    def _closed_remotely(self, hub: BackendHub, live: Live) -> None:
        hub.end_session(live.session_id)
        self.drop(live)

    def drop(self, live: Live) -> None:
        """Stop following the session (its local subscriptions are gone or ended)."""
        if live.dead:
            return
        live.dead = True
        if live.closed is not None:
            live.closed.set()
        self._clear_pending(live)
        if self.sessions.get(live.session_id) is live:
            del self.sessions[live.session_id]
            del self._channels[live.channel]
            link = self._link
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

    # -- attach: from a stream read to live delivery ---------------------------------------

    async def attach(
        self,
        hub: BackendHub,
        session_id: str,
        last_event_id: str | None,
        register: Callable[[], None],
        read: ReadStream,
    ) -> Replay:
        """Follow the session and compute the replay up to the cursor (`Backend.attach`).

        Retries until it succeeds; the caller bounds the wait.

        Raises:
            SessionLimitError: this process already follows ``max_sessions`` sessions.
            BackendUnavailableError: Redis refused to read the stream.
            BroadcasterClosedError: the backend closed meanwhile.
        """
        while True:
            live = self.follow(hub, session_id)
            live.attaching += 1
            try:
                replay = await self._attach_once(hub, live, last_event_id, register, read)
            finally:
                live.attaching -= 1
                if not live.dead and live.attaching == 0 and not hub.has_subscribers(session_id):
                    self.drop(live)
            if replay is not None:
                return replay

    async def _attach_once(
        self,
        hub: BackendHub,
        live: Live,
        last_event_id: str | None,
        register: Callable[[], None],
        read: ReadStream,
    ) -> Replay | None:
        """One attempt; None to start over (connection changed, session dropped, lagging)."""
        # The SUBSCRIBE must be confirmed before the stream is read: then every event
        # after what the read returns arrives on the Pub/Sub connection.
        while live.confirmed != self._generation or self._link is None:
            if self.closed:
                raise BroadcasterClosedError("the backend is closed")
            if live.dead:
                return None
            await self.wait_changed()
        after = ""
        client_key: Key | None = None
        if last_event_id is not None:
            client_key = parse_id(last_event_id)
            if client_key is not None:
                after = last_event_id
        async with live.lock:
            if self.closed:
                raise BroadcasterClosedError("the backend is closed")
            if live.dead or live.confirmed != self._generation:
                return None
            cursor = live.cursor
            if cursor is not None and last_event_id is None:
                register()  # nothing to replay: live delivery starts after the cursor
                return Replay((), False)
            # Replay up to the cursor: what the reader delivers next comes after it.
            # "" is a cursor before any entry (the stream did not exist); None reads
            # up to the stream's end and makes its last id the cursor.
            upto = "" if cursor is None else (cursor or "0-0")
            if cursor is None:  # a fresh start: nothing before this read is due
                live.overflowed = live.close_seen = False
            live.hold += 1
            try:
                try:
                    last, gap, entries = await read(live.key, after, upto)
                except ResponseError as exc:
                    raise BackendUnavailableError(
                        f"could not subscribe to session {live.session_id!r}: Redis refused "
                        f"to read its stream ({exc})"
                    ) from exc
                except (RedisError, OSError) as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    failed = True
                else:
                    failed = False
                if failed:
                    wait = True
                elif (
                    gap
                    and cursor is not None
                    and client_key is not None
                    and client_key > live.cursor_key
                    and last
                    and client_key <= key_of(last)
                ):
                    # The client saw events this process's reader has not delivered
                    # yet (it read them on another node): wait for the reader.
                    wait = True
                else:
                    wait = False
                    if cursor is None:
                        live.cursor = last
                        live.cursor_key = key_of(last) if last else NO_KEY
                    register()
            finally:
                live.hold -= 1
                if live.overflowed and not live.hold:
                    if live.cursor is None:  # nobody registered: nothing to catch up on
                        live.overflowed = live.close_seen = False
                    elif not live.recovering:
                        self._reread(live)
            self._flush(hub, live)
        if wait:
            await anyio.sleep(self._min_backoff if failed else 0.001)
            return None
        if last_event_id is None:
            return Replay((), False)
        if client_key is None:
            gap = True
        events = decode_entries(live.session_id, entries)
        if not hub.config.max_history_per_session:
            events = []
        return Replay(events, gap)

    # -- recovery: reading streams from the cursors after a loss or an overflow ------------

    async def _recover_loop(
        self, hub: BackendHub, link: Link, fail: Callable[[BaseException], None]
    ) -> None:
        """Catch up the sessions queued in ``link.recover``, many per round trip.

        Sessions whose lock is free are read in pipelined batches of
        `_RECOVERY_BATCH`; one an attach holds is done alone once the attach is over.
        """
        try:
            while True:
                if not link.recover:
                    await self.wait_changed()
                    continue
                queued, link.recover = link.recover, []
                batch: list[Live] = []
                busy: list[Live] = []
                seen: set[int] = set()
                for live in queued:
                    if id(live) in seen or not self._due(live, link):
                        continue
                    seen.add(id(live))
                    (busy if live.lock.locked() else batch).append(live)
                for i in range(0, len(batch), _RECOVERY_BATCH):
                    await self._recover_batch(hub, link, batch[i : i + _RECOVERY_BATCH])
                for live in busy:
                    async with live.lock:
                        if self._due(live, link):
                            await self._recover_batch(hub, link, [live], locked=True)
                self._recovery_done(link)
        except (RedisError, OSError) as exc:
            fail(exc)

    def _due(self, live: Live, link: Link) -> bool:
        return not live.dead and live.recovering and live.confirmed == link.generation

    def _recovery_done(self, link: Link) -> None:
        if self.recovery_started is None or link.recover:
            return
        if any(live.recovering for live in self.sessions.values()):
            return
        self.last_recovery = time.monotonic() - self.recovery_started
        self.recovery_started = None
        logger.info("recovered every followed session in %.3f s", self.last_recovery)

    async def _recover_batch(
        self, hub: BackendHub, link: Link, lives: list[Live], locked: bool = False
    ) -> None:
        """Read the sessions' streams from their cursors in one pipeline and deliver."""
        held: list[Live] = []
        try:
            if not locked:
                for live in lives:
                    try:
                        live.lock.acquire_nowait()
                    except anyio.WouldBlock:  # an attach took it since: queue it again
                        link.recover.append(live)
                    else:
                        held.append(live)
                lives = [live for live in held if self._due(live, link)]
            if not lives:
                return
            assert self._read_many is not None
            # From here on, messages are buffered again: this read covers the earlier ones.
            cursors: list[tuple[str, str]] = []
            for live in lives:
                live.overflowed = False
                assert live.cursor is not None
                cursors.append((live.key, live.cursor))
            results = await self._read_many(cursors)
            for live, (_, gap, entries) in zip(lives, results, strict=True):
                if self._due(live, link):
                    self._recovered_from(hub, link, live, bool(gap), entries)
        finally:
            for live in held:
                live.lock.release()

    def _recovered_from(
        self, hub: BackendHub, link: Link, live: Live, gap: bool, entries: Sequence[Any]
    ) -> None:
        """Deliver what the session's stream holds after the cursor; end it on a gap."""
        cursor = live.cursor
        assert cursor is not None
        if live.close_seen:  # closed while its buffer was dropped
            self._closed_remotely(hub, live)
            return
        delivered = 0
        # On a gap nothing is delivered: the subscriber resumes from its last id and
        # is told of the gap at entry, with what is retained replayed after it.
        for event in () if gap else decode_entries(live.session_id, entries):
            key = key_of(event.id)
            if key > live.cursor_key:
                live.cursor_key = key
                live.cursor = event.id
                hub.deliver(live.session_id, event)
                delivered += 1
        self.recovered += delivered
        if not gap and live.overflowed:
            # More arrived during the read than the buffer holds: read again. A
            # session that cannot be caught up in a few rounds ends its
            # subscriptions as on a gap; they resume from history.
            live.rounds += 1
            if live.rounds < _MAX_ROUNDS:
                link.recover.append(live)
                return
        live.rounds = 0
        live.recovering = False
        if gap or live.overflowed:
            self.live_gaps += 1
            reason = "is gone from Redis" if gap else "could not be caught up"
            logger.warning(
                "session %r: history after %r %s; ending its subscriptions with GapError",
                live.session_id,
                cursor,
                reason,
            )
            why = (
                "Redis no longer holds them"
                if gap
                else "they arrived faster than this process could catch up"
            )
            hub.end_session(
                live.session_id,
                GapError(
                    f"events of session {live.session_id!r} after {cursor!r} may have been "
                    f"lost: {why}; resubscribe with the last event id"
                ),
            )
            self.drop(live)
            return
        if delivered:
            logger.info("session %r: recovered %d events from Redis", live.session_id, delivered)
        self._flush(hub, live)
