"""Checks on a broadcaster that the core, Redis and multi-session tests share."""

from __future__ import annotations

import anyio

from sse_broadcaster import BroadcasterError, EventBroadcaster


async def enter_concurrently(
    broadcaster: EventBroadcaster, session_ids: list[str]
) -> tuple[int, list[BaseException]]:
    """Enter a subscription to each session at once, each in its own task.

    Every admitted subscription stays open until every entry has been decided,
    so that none makes room for another. Returns (admitted, errors).
    """
    admitted = 0
    errors: list[BaseException] = []
    decided = anyio.Event()

    async def enter(session_id: str) -> None:
        nonlocal admitted
        try:
            async with broadcaster.subscribe(session_id):
                admitted += 1
                if admitted + len(errors) == len(session_ids):
                    decided.set()
                await decided.wait()
        except BroadcasterError as exc:
            errors.append(exc)
            if admitted + len(errors) == len(session_ids):
                decided.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for session_id in session_ids:
                tg.start_soon(enter, session_id)
    return admitted, errors


def assert_nothing_held(broadcaster: EventBroadcaster, *session_ids: str) -> None:
    assert broadcaster.stats()["totalSubscribers"] == 0
    for session_id in session_ids:
        assert broadcaster.subscriber_count(session_id) == 0
    assert broadcaster._hub.entering() == 0
