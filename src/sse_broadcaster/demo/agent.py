"""The demo's "agent run" (#13): a simulated token stream as a resumable run.

No model: `simulated_answer` yields the words of `simulated_tokens(seed, count)`
with an LLM's pacing (a token every 20-60 ms, a longer pause after a sentence).
The same seed gives the same words, so a test can tell a hole or a duplicate
from the text alone. `run_routes` adds the routes of the ``/run`` page: start
(POST), follow (GET, `sse_broadcaster.starlette.follow_run`), stop (POST) and
the run's state; the app's same-origin middleware guards the POSTs as it
guards ``/publish``.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import (
    BroadcasterError,
    EventBroadcaster,
    RunActiveError,
    RunLimitError,
    SessionLimitError,
    check_session_id,
)
from ..starlette import follow_run

__all__ = [
    "DEFAULT_PACING",
    "DEFAULT_RUN",
    "DEFAULT_RUN_TOKENS",
    "RUN_SESSION_PREFIX",
    "run_routes",
    "run_session",
    "simulated_answer",
    "simulated_tokens",
]

DEFAULT_RUN = "agent"
"""The run the ``/run`` page opens by default."""
DEFAULT_RUN_TOKENS = 300
"""Tokens in one simulated answer."""
DEFAULT_PACING = (0.02, 0.06)
"""Seconds between two tokens: drawn evenly in this range (a sentence's end waits more)."""
RUN_SESSION_PREFIX = "run:"
"""Runs live in sessions of their own, apart from the rooms: ``run:NAME``."""
MAX_SEED = 2**32 - 1
_MAX_BODY = 1024

_Endpoint = Callable[[Request], Awaitable[Response]]

_TEXT = (
    "the events stream from the server to every open tab while the model writes its answer "
    "one token at a time and a reload picks up exactly where the page left off because each "
    "token carries an id the browser sends back as Last-Event-ID so nothing is lost and "
    "nothing comes twice even when the network drops for a moment or a second window "
    "follows the same run from its first word until the end marker says it finished"
)
_WORDS = tuple(_TEXT.split())


def simulated_tokens(seed: int, count: int) -> list[str]:
    """The `count` tokens of the answer for `seed`: words, spaces and full stops."""
    rng = random.Random(seed)
    tokens: list[str] = []
    sentence = 0
    for i in range(count):
        word = rng.choice(_WORDS)
        if sentence == 0:
            word = word[:1].upper() + word[1:]
        sentence += 1
        last = i == count - 1
        if last or (sentence >= 6 and rng.random() < 0.2):
            tokens.append(word + ". ")
            sentence = 0
        else:
            tokens.append(word + " ")
    return tokens


async def simulated_answer(
    seed: int, count: int = DEFAULT_RUN_TOKENS, pacing: tuple[float, float] = DEFAULT_PACING
) -> AsyncIterator[dict[str, Any]]:
    """Yield ``{"i": n, "text": token}`` for each token, paced like a model's output."""
    pace = random.Random(~seed)
    low, high = pacing
    for i, token in enumerate(simulated_tokens(seed, count)):
        await anyio.sleep(pace.uniform(low, high))
        yield {"i": i, "text": token}
        if token.endswith(". "):
            await anyio.sleep(pace.uniform(high, 2 * high))  # a pause between sentences


def run_session(name: str) -> str:
    """The session of the run `name`.

    Raises:
        ValueError: the name makes no valid session id.
    """
    return check_session_id(RUN_SESSION_PREFIX + name)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _session_of(request: Request) -> str | JSONResponse:
    name: str = request.path_params["name"]
    try:
        return run_session(name)
    except ValueError as exc:
        return _error(400, f"invalid run name: {exc}")


async def _seed_of(request: Request) -> int | JSONResponse:
    """The seed a ``POST /runs/NAME`` asks for (``{"seed": n}``), else a random one."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _MAX_BODY:  # read no further
            return _error(413, f"request body is larger than {_MAX_BODY} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return secrets.randbelow(MAX_SEED + 1)
    try:
        fields = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _error(400, f"malformed JSON body: {exc}")
    if not isinstance(fields, dict) or set(fields) - {"seed"}:
        return _error(400, 'the body takes only {"seed": n}')
    seed = fields.get("seed")
    if seed is None:
        return secrets.randbelow(MAX_SEED + 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        return _error(400, f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}"[:200])
    return seed


def run_routes(
    broadcaster: EventBroadcaster,
    *,
    tokens: int = DEFAULT_RUN_TOKENS,
    pacing: tuple[float, float] = DEFAULT_PACING,
) -> list[Route]:
    """The routes of the agent run page; see docs/demo.md."""

    async def start(request: Request) -> Response:
        session_id = _session_of(request)
        if isinstance(session_id, Response):
            return session_id
        seed = await _seed_of(request)
        if isinstance(seed, Response):
            return seed
        try:
            run = await broadcaster.start_run(
                session_id, simulated_answer(seed, tokens, pacing), event="token"
            )
        except RunActiveError as exc:
            return _error(409, str(exc))
        except (RunLimitError, SessionLimitError) as exc:
            return _error(429, str(exc))
        except BroadcasterError as exc:
            return _error(503, str(exc))
        body = {"runId": run.run_id, "state": run.state.value, "seed": seed, "tokens": tokens}
        return JSONResponse(body, status_code=202)

    async def events(request: Request) -> Response:
        session_id = _session_of(request)
        if isinstance(session_id, Response):
            return session_id
        try:
            return await follow_run(broadcaster, session_id, request)
        except BroadcasterError as exc:  # a backend that keeps no runs
            return _error(503, str(exc))

    async def cancel(request: Request) -> Response:
        session_id = _session_of(request)
        if isinstance(session_id, Response):
            return session_id
        try:
            cancelled = await broadcaster.cancel_run(session_id)
        except BroadcasterError as exc:
            return _error(503, str(exc))
        return JSONResponse({"cancelled": cancelled})

    async def state(request: Request) -> Response:
        session_id = _session_of(request)
        if isinstance(session_id, Response):
            return session_id
        try:
            info = await broadcaster.run_info(session_id)
        except BroadcasterError as exc:
            return _error(503, str(exc))
        if info is None:
            return _error(404, f"no run named {request.path_params['name']!r}")
        return JSONResponse(
            {
                "runId": info.run_id,
                "state": info.state.value,
                "events": info.events,
                "retained": info.retained,
                "endEventId": info.end_event_id,
            }
        )

    table: list[tuple[str, _Endpoint, str]] = [
        ("/runs/{name}", start, "POST"),
        ("/runs/{name}", state, "GET"),
        ("/runs/{name}/events", events, "GET"),
        ("/runs/{name}/cancel", cancel, "POST"),
    ]
    return [Route(path, function, methods=[method]) for path, function, method in table]
