from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from fastapi import Cookie, Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel

from sse_broadcaster import EventBroadcaster, RunActiveError, check_session_id
from sse_broadcaster.starlette import EventSourceResponse, follow_run, lifespan

broadcaster = EventBroadcaster()
app = FastAPI(lifespan=lifespan(broadcaster))

USERS = {"token-alice": "alice", "token-bob": "bob"}  # your real auth here


def current_user(session: str | None = Cookie(default=None)) -> str:
    # A cookie, not an Authorization header: a browser's EventSource sends cookies only.
    user = USERS.get(session or "")
    if user is None:
        raise HTTPException(401, "log in first")
    return user


def run_session(run_id: str, user: str = Depends(current_user)) -> str:
    """The run's session: a user reaches only their own runs."""
    session_id = f"{user}/{run_id}"
    try:
        check_session_id(session_id)
    except ValueError as exc:
        raise HTTPException(400, f"invalid run id: {exc}") from None
    return session_id


class Ask(BaseModel):
    prompt: str


async def answer(prompt: str) -> AsyncIterator[dict[str, str]]:
    for word in f"You asked: {prompt}. Here is a long answer.".split():  # your model here
        await anyio.sleep(0.02)
        yield {"text": word + " "}


@app.post("/runs/{run_id}", status_code=202)
async def start(ask: Ask, session_id: str = Depends(run_session)) -> dict[str, str]:
    try:
        run = await broadcaster.start_run(session_id, answer(ask.prompt), event="token")
    except RunActiveError:
        raise HTTPException(409, "this run is still running") from None
    return {"runId": run.run_id, "state": run.state.value}


@app.get("/runs/{run_id}/events", response_class=EventSourceResponse)
async def events(request: Request, session_id: str = Depends(run_session)) -> Response:
    return await follow_run(broadcaster, session_id, request)


@app.post("/runs/{run_id}/cancel")
async def cancel(session_id: str = Depends(run_session)) -> dict[str, bool]:
    return {"cancelled": await broadcaster.cancel_run(session_id)}
