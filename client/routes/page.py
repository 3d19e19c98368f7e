"""The web page (index and static files) and its login."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import FileResponse

from ..security import SESSION_COOKIE, hash_key
from .models import Login
from .state import StateDep

WEB = Path(__file__).resolve().parent.parent / "web"

router = APIRouter()


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(WEB / "index.html", media_type="text/html")


@router.get("/static/{name:path}", include_in_schema=False)
def static(name: str) -> FileResponse:
    path = (WEB / name).resolve()
    if not path.is_relative_to(WEB.resolve()) or not path.is_file():
        raise HTTPException(404, "not found")
    return FileResponse(path)


@router.post("/api/session", status_code=204)
def login(state: StateDep, response: Response, body: Login) -> None:
    """Trade the API key for an HttpOnly session cookie (the page's login)."""
    policy = state.policy()
    if not policy.api_key_hash or not secrets.compare_digest(hash_key(body.api_key), policy.api_key_hash):
        raise HTTPException(401, "wrong API key")
    response.set_cookie(
        SESSION_COOKIE, state.sessions.new(), httponly=True, samesite="strict", secure=False, path="/"
    )
