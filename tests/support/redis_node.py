"""One node of a multi-process test: an EventBroadcaster on a RedisBackend.

Run as ``python tests/support/redis_node.py '<json options>'``. Commands arrive as JSON
lines on stdin; every report leaves as a JSON line on stdout, tagged with the
command's ``tag``:

- ``{"op": "subscribe", "tag", "session", "last_event_id", "limit"}``: reports
  ``entered`` (gap, replayed), each ``event`` (id, data), then ``end`` (error
  class name or null); stops after ``limit`` events when given.
- ``{"op": "unsubscribe", "tag"}``
- ``{"op": "publish", "tag", "session", "count", "interval"}``: publishes
  ``count`` events (data ``"<tag>:<i>"``), reporting each ``ack`` (id) or
  ``nack`` (error class name), then ``done``.
- ``{"op": "start_run", "tag", "session", "count", "interval"}``: starts a run of
  ``count`` items (``"<tag>:<i>"``, ``interval`` s apart; ``count`` null: endless),
  reporting ``started`` (run_id) or ``refused`` (error class name), and ``finally``
  when the generator's ``finally`` ran.
- ``{"op": "cancel_run", "tag", "session"}``: reports ``cancelled`` (the result).
- ``{"op": "subscribe", ..., "until_end": true}``: follows the session's run.
- ``{"op": "stats", "tag"}``: reports ``stats`` (the broadcaster's stats).
- ``{"op": "quit"}``
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio

from sse_broadcaster import BroadcasterConfig, BroadcasterError, EventBroadcaster
from sse_broadcaster.redis import RedisBackend


def report(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def subscribe(broadcaster: EventBroadcaster, command: dict[str, Any]) -> None:
    tag = command["tag"]
    limit = command.get("limit")
    received = 0
    try:
        async with broadcaster.subscribe(
            command["session"],
            last_event_id=command.get("last_event_id"),
            until_end=bool(command.get("until_end")),
        ) as sub:
            report(tag=tag, type="entered", gap=sub.gap, replayed=sub.replayed)
            async for event in sub:
                report(tag=tag, type="event", id=event.id, data=event.data, event=event.event)
                received += 1
                if limit is not None and received >= limit:
                    break
    except BroadcasterError as exc:
        report(tag=tag, type="end", error=type(exc).__name__, message=str(exc))
    else:
        report(tag=tag, type="end", error=None)


async def publish(broadcaster: EventBroadcaster, command: dict[str, Any]) -> None:
    tag = command["tag"]
    interval = command.get("interval", 0)
    for i in range(command.get("count", 1)):
        try:
            event = await broadcaster.publish(command["session"], f"{tag}:{i}")
        except BroadcasterError as exc:
            report(tag=tag, type="nack", i=i, error=type(exc).__name__)
        else:
            report(tag=tag, type="ack", i=i, id=event.id)
        if interval:
            await anyio.sleep(interval)
    report(tag=tag, type="done")


async def start_run(broadcaster: EventBroadcaster, command: dict[str, Any]) -> None:
    tag = command["tag"]
    count = command.get("count")
    interval = command.get("interval", 0.01)

    async def items() -> Any:
        try:
            i = 0
            while count is None or i < count:
                yield f"{tag}:{i}"
                i += 1
                await anyio.sleep(interval)
        finally:
            report(tag=tag, type="finally")

    try:
        info = await broadcaster.start_run(command["session"], items())
    except BroadcasterError as exc:
        report(tag=tag, type="refused", error=type(exc).__name__, message=str(exc))
    else:
        report(tag=tag, type="started", run_id=info.run_id)


async def serve(options: dict[str, Any]) -> None:
    config = BroadcasterConfig(**options.get("config", {}))
    backend = RedisBackend(options["url"], prefix=options["prefix"], **options.get("backend", {}))
    stdin = anyio.wrap_file(sys.stdin)
    async with EventBroadcaster(config, backend=backend) as broadcaster:
        scopes: dict[str, anyio.CancelScope] = {}

        async def run(command: dict[str, Any]) -> None:
            with anyio.CancelScope() as scope:
                scopes[command["tag"]] = scope
                if command["op"] == "subscribe":
                    await subscribe(broadcaster, command)
                else:
                    await publish(broadcaster, command)

        report(tag="node", type="ready")
        async with anyio.create_task_group() as tg:
            while True:
                line = await stdin.readline()
                if not line:
                    break
                command = json.loads(line)
                op = command["op"]
                if op == "quit":
                    break
                if op in ("subscribe", "publish"):
                    tg.start_soon(run, command)
                elif op == "unsubscribe":
                    scopes[command["tag"]].cancel()
                    report(tag=command["tag"], type="end", error="cancelled")
                elif op == "start_run":
                    await start_run(broadcaster, command)
                elif op == "cancel_run":
                    cancelled = await broadcaster.cancel_run(command["session"])
                    report(tag=command["tag"], type="cancelled", result=cancelled)
                elif op == "stats":
                    report(tag=command["tag"], type="stats", stats=broadcaster.stats())
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(serve, json.loads(sys.argv[1]), backend="asyncio")
