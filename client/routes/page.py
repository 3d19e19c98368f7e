"""The web page (index and static files) and its login."""

from __future__ import annotations

import html
import secrets
from pathlib import Path

from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import FileResponse, HTMLResponse

from ..security import SESSION_COOKIE, hash_key
from .models import Login
from .state import StateDep

WEB = Path(__file__).resolve().parent.parent / "web"

router = APIRouter()


MODEL_OPTIONS = (
    "<!-- model options: filled in from the model registry by the server (client/routes/page.py) -->"
)


@router.get("/", include_in_schema=False)
def index() -> HTMLResponse:
    return HTMLResponse(index_html())


def index_html() -> str:
    """The page, its model list the registry's (train/families.py): a model registered is offered,
    with no edit to the page; the edit models (trained on pairs) and the video models (on clips) in
    their own groups."""
    from train.families import MODEL_IDS, model_info

    def options(models: list[str]) -> str:
        return "".join(
            f'\n                <option value="{html.escape(m)}">{html.escape(m)}</option>' for m in models
        )

    edit = [m for m in MODEL_IDS if model_info(m).controls_required]
    video = [m for m in MODEL_IDS if model_info(m).video]
    plain = [m for m in MODEL_IDS if m not in edit and m not in video]
    groups = (
        f'<optgroup label="Text to image">{options(plain)}\n              </optgroup>\n'
        f'              <optgroup label="Edit (trains on before/after pairs)">{options(edit)}\n              </optgroup>\n'
        f'              <optgroup label="Video (trains on clips)">{options(video)}\n              </optgroup>'
    )
    page = (WEB / "index.html").read_text(encoding="utf-8")
    assert MODEL_OPTIONS in page, "index.html lost its model options placeholder"
    return page.replace(MODEL_OPTIONS, groups)


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
