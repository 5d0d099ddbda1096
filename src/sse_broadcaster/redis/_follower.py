"""Following Redis: the Pub/Sub connection, the attach handover and recovery.

`Follower` owns the Pub/Sub connection of the sessions in its `Sessions`: it
reconnects with backoff after a loss, resubscribes and waits for the
confirmations; it hands live messages to `BackendHub.deliver`, and hands a new
subscriber over from a stream read to live delivery with no duplicate and no
hole (`Follower.attach`). `Recovery` then reads each session's stream from its
cursor, so no acknowledged event is lost while history holds it; if that
history is gone, the session's local subscriptions end with `GapError`. Both
read streams through the callables they are given, never through the backend.
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

from .._errors import BackendUnavailableError, BroadcasterClosedError, GapError
from ..backends._base import BackendHub, Replay
from ._frames import frame_reader, stream_of
from ._scripts import (
    CLOSE,
    EMPTY_POSITION,
    NO_KEY,
    Key,
    decode_entries,
    key_of,
    message_key,
    parse_id,
)
from ._sessions import Link, Live, Sessions

__all__ = ["Follower", "ReadStream", "ReadStreams", "Recovery"]

logger = logging.getLogger("sse_broadcaster")

# Sessions whose streams one pipelined round trip of a recovery reads.
_RECOVERY_BATCH = 200
# Reads in a row of one session whose buffer overflowed meanwhile before giving up.
_MAX_ROUNDS = 8

ReadStream = Callable[[str, str, str], Awaitable[tuple[str, bool, Sequence[Any]]]]
"""(key, after, upto) -> the stream's last id, gap, entries (the read script)."""
ReadStreams = Callable[[Sequence[tuple[str, str]]], Awaitable[Sequence[Any]]]
"""[(key, after)] -> each stream's [last, gap, entries] after it, in one round trip."""


class Follower:
    """The Pub/Sub connection of the followed sessions, and attaches to them.

    Its public attributes are figures of `RedisBackend.stats`.
    """

    def __init__(
        self,
        table: Sessions,
        read_many: ReadStreams,
        *,
        health_interval: float,
        min_backoff: float,
        max_backoff: float,
    ) -> None:
        self.table = table
        self.recovery = Recovery(table, read_many)
        self._health_interval = health_interval
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._generation = 0
        self.closed = False
        # figures for stats()
        self.connected = False
        self.ever_connected = False
        self.reconnects = 0
        self.received = 0
        self.last_error: str | None = None

    def close(self) -> None:
        """Stop: waiting attaches raise `BroadcasterClosedError`, `run` ends its loop."""
        self.closed = True
        self.table.notify()

    # -- the Pub/Sub connection ----------------------------------------------------------

    async def run(self, hub: BackendHub, connect: Callable[[], AbstractConnection]) -> None:
        """Follow Redis until cancelled, reconnecting with jittered exponential backoff."""
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
        if self.table.link is None:
            return
        self.table.link = None
        self.connected = False
        for live in self.table.sessions.values():
            live.confirmed = -1
            if live.cursor is not None:
                live.recovering = True
        if not self.closed:
            logger.warning("lost the Redis Pub/Sub connection (%s); reconnecting", self.last_error)
        self.table.notify()

    async def _serve(self, hub: BackendHub, conn: AbstractConnection) -> None:
        self._generation += 1
        link = Link(conn, self._generation)
        if self.ever_connected:
            self.reconnects += 1
            if self.table.sessions:
                self.recovery.started = time.monotonic()
            logger.info("reconnected to Redis; resubscribing %d sessions", len(self.table.sessions))
        self.ever_connected = True
        self.table.link = link
        for live in self.table.sessions.values():
            link.subscribe(live)
        self.connected = True
        self.table.notify()
        failure: list[BaseException] = []
        async with anyio.create_task_group() as tg:

            def fail(exc: BaseException) -> None:
                failure.append(exc)
                tg.cancel_scope.cancel()

            tg.start_soon(self._read_loop, hub, link, fail)
            tg.start_soon(link.write_loop, fail)
            tg.start_soon(link.health_loop, self._health_interval, fail)
            tg.start_soon(self.recovery.loop, hub, link, fail)
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
            live = self.table.channels.get(response[1])
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
                self.table.buffer(live, NO_KEY, None)
            else:
                self.table.closed_remotely(hub, live)
            return
        key = message_key(payload)
        if live.hold or live.recovering:
            self.table.buffer(live, key, payload)
        elif live.cursor is not None:  # else nobody attached yet, or leaving
            self.table.deliver(hub, live, key, payload)

    def _on_subscribed(self, link: Link, channel: bytes) -> None:
        due = link.expected.get(channel, 0) - 1
        if due > 0:
            link.expected[channel] = due
            return
        link.expected.pop(channel, None)
        live = self.table.channels.get(channel)
        if live is None:
            return
        live.confirmed = link.generation
        if live.recovering:
            link.recover.append(live)
        self.table.notify()

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
            live = self.table.follow(hub, session_id)
            live.attaching += 1
            try:
                replay = await self._attach_once(hub, live, last_event_id, register, read)
            finally:
                live.attaching -= 1
                if not live.dead and live.attaching == 0 and not hub.has_subscribers(session_id):
                    self.table.drop(live)
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
        while live.confirmed != self._generation or self.table.link is None:
            if self.closed:
                raise BroadcasterClosedError("the backend is closed")
            if live.dead:
                return None
            await self.table.wait_changed()
        after = ""
        client_key: Key | None = None
        position: str | None = None
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
                return Replay((), False, cursor or EMPTY_POSITION)
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
                    # Live delivery to the subscriber starts after the cursor (the
                    # flush below delivers what arrived during the read after it).
                    position = live.cursor or EMPTY_POSITION
            finally:
                live.hold -= 1
                if live.overflowed and not live.hold:
                    if live.cursor is None:  # nobody registered: nothing to catch up on
                        live.overflowed = live.close_seen = False
                    elif not live.recovering:
                        self.table.reread(live)
            self.table.flush(hub, live)
        if wait:
            await anyio.sleep(self._min_backoff if failed else 0.001)
            return None
        if last_event_id is None:
            return Replay((), False, position)
        if client_key is None:
            gap = True
        events = decode_entries(live.session_id, entries)
        if not hub.config.max_history_per_session:
            events = []
        return Replay(events, gap, position)


class Recovery:
    """Catches followed sessions up from their streams after a lost connection or an overflow.

    Sessions are queued in `Link.recover` (by the SUBSCRIBE confirmation of a
    session that was followed before the loss, or by `Sessions.reread`).
    """

    def __init__(self, table: Sessions, read_many: ReadStreams) -> None:
        self.table = table
        self.read_many = read_many
        # figures for stats()
        self.recovered = 0
        self.live_gaps = 0
        self.started: float | None = None  # when the recovery after a reconnection began
        self.last: float | None = None  # how long the last one took

    async def loop(
        self, hub: BackendHub, link: Link, fail: Callable[[BaseException], None]
    ) -> None:
        """Catch up the sessions queued in ``link.recover``, many per round trip.

        Sessions whose lock is free are read in pipelined batches of
        `_RECOVERY_BATCH`; one an attach holds is done alone once the attach is over.
        """
        try:
            while True:
                if not link.recover:
                    await self.table.wait_changed()
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
        if self.started is None or link.recover:
            return
        if any(live.recovering for live in self.table.sessions.values()):
            return
        self.last = time.monotonic() - self.started
        self.started = None
        logger.info("recovered every followed session in %.3f s", self.last)

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
            # From here on, messages are buffered again: this read covers the earlier ones.
            cursors: list[tuple[str, str]] = []
            for live in lives:
                live.overflowed = False
                assert live.cursor is not None
                cursors.append((live.key, live.cursor))
            results = await self.read_many(cursors)
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
            self.table.closed_remotely(hub, live)
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
            self.table.drop(live)
            return
        if delivered:
            logger.info("session %r: recovered %d events from Redis", live.session_id, delivered)
        self.table.flush(hub, live)
