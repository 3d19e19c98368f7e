"""`advanced-trainer serve`: the REST API (for tools and the web page) and the webhook receiver.

Jobs live in the SQLite store; webhooks and a background poller both feed
``JobStore.apply_remote`` (events may arrive in any order, any number of times). The poller
follows every unfinished job that has no webhooks flowing: jobs submitted without a public URL,
and jobs whose webhooks stopped. Succeeded jobs are delivered to cloud_outputs/<id>/.
The OpenAPI document is at /openapi.json; the routes are in ``client.routes``, one module per resource.

Errors answer ``{"detail": ...}``: a string, or ``{"problems": [{"field", "message"}]}`` for a bad
spec or request body (the web page shows each problem beside its field).
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from train.spec import SpecError

from .config import load_secrets, save_secret
from .errors import ClientError, http_status
from .jobs import epoch_seconds
from .records import Job
from .routes import ROUTERS
from .routes.state import API_KEY_SECRET, State
from .security import SecurityMiddleware, hash_key, is_loopback

__all__ = ["State", "create_app", "poll_once", "serve", "ensure_api_key", "uvicorn_config"]

POLL_QUIET_S = 60.0  # poll a job whose webhooks have been silent this long
POLL_MIN_S, POLL_MAX_S = 2.0, 30.0


def create_app(state: State) -> FastAPI:
    # /docs would load Swagger UI from a CDN (no network, and against the CSP); /openapi.json stays.
    app = FastAPI(
        title="advanced-trainer",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        description="Submit and track training jobs; receives Replicate's signed webhooks.",
    )
    app.state.trainer = state
    app.add_middleware(SecurityMiddleware, policy=state.policy, sessions=state.sessions)
    app.add_exception_handler(ClientError, _client_error)
    app.add_exception_handler(SpecError, _spec_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for router in ROUTERS:
        app.include_router(router)
    return app


# -- error answers (one shape for the page: detail is a string or {"problems": [...]}) -------------


async def _client_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClientError)
    return JSONResponse({"detail": str(exc)}, status_code=http_status(exc))


def _problem(field: str | None, message: str) -> dict[str, str | None]:
    return {"field": field, "message": message}


async def _spec_error(request: Request, exc: Exception) -> JSONResponse:
    """A SpecError's "field: message" lines as problems."""
    assert isinstance(exc, SpecError)
    problems = []
    for line in exc.problems:
        field, sep, message = line.partition(":")
        problems.append(_problem(field, message.strip()) if sep else _problem(None, line))
    return JSONResponse({"detail": {"problems": problems}}, status_code=422)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A request body or query FastAPI refused, as problems naming each field. The values sent are
    never echoed (one of them may be a token)."""
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        message = (
            "unknown field"
            if err.get("type") == "extra_forbidden"
            else str(err.get("msg", "invalid")).removeprefix("Value error, ")
        )
        problems.append(_problem(".".join(loc) or None, message))
    return JSONResponse({"detail": {"problems": problems}}, status_code=422)


# -- the poller ------------------------------------------------------------------------------------


def _poll_job(state: State, rec: Job, now: float) -> bool:
    """Poll one job when it is due; True when it was polled."""
    last = rec.get("last_event_at")
    if rec.get("webhook") and last and now - epoch_seconds(last) < POLL_QUIET_S:
        return False  # webhooks are flowing
    due, interval = state.next_poll.get(rec["id"], (0.0, POLL_MIN_S))
    if now < due:
        return False
    try:
        obj = state.provider_for(rec).get(rec["kind"], rec["id"])
        _, changed = state.apply(rec["id"], obj, "poll")
        interval = POLL_MIN_S if changed else min(POLL_MAX_S, interval * 1.5)
    except ClientError:
        interval = min(POLL_MAX_S, interval * 2)
    state.next_poll[rec["id"]] = (now + interval, interval)
    return True


def poll_once(state: State, now: float | None = None) -> int:
    """Poll the unfinished jobs that are due, and deliver succeeded ones not yet delivered; returns
    how many were polled."""
    now = time.time() if now is None else now
    polled = sum(
        _poll_job(state, rec, now) for rec in state.store.unfinished() if rec["status"] != "submitting"
    )
    for rec in state.store.list(limit=50, status="succeeded"):
        if not rec.get("delivered"):
            state.deliver_async(rec["id"])
    return polled


def _poller(state: State) -> None:
    while not state.stop.wait(1.0):
        try:
            poll_once(state)
        except Exception as exc:  # noqa: BLE001 - the poller must survive anything and try again
            print(f"poller: {type(exc).__name__}: {exc}", flush=True)


# -- serving ---------------------------------------------------------------------------------------


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    """uvicorn settings for the app. proxy_headers is off: uvicorn would otherwise believe
    X-Forwarded-For from loopback and hand the webhook allow-list a forged client address;
    the trusted_proxies setting (client.webhooks.client_ip) is the one place XFF is read."""
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, proxy_headers=False, server_header=False
    )


def ensure_api_key(root: Path | None = None) -> str | None:
    """For a bind beyond loopback: make an API key if there is none; returns a new key (shown once)."""
    if load_secrets(root).get(API_KEY_SECRET):
        return None
    key = "at_" + secrets.token_urlsafe(32)
    save_secret(API_KEY_SECRET, hash_key(key), root)
    return key


def serve(host: str = "127.0.0.1", port: int = 8080) -> None:
    if not is_loopback(host):
        key = ensure_api_key()
        if key:
            print(
                f"serving beyond loopback: every route but the webhooks needs this API key (shown once; "
                f"only its hash is stored):\n  {key}",
                flush=True,
            )
    state = State(host=host, port=port)
    app = create_app(state)
    threading.Thread(target=_poller, args=(state,), daemon=True).start()
    print(f"advanced-trainer serving on http://{host}:{port} (API document at /openapi.json)", flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, host, port)).run()
    finally:
        state.stop.set()
