"""The provider's settings, the API token, spend limit, prices and Replicate's status."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Body

from .. import pricing
from .. import token as tokens
from ..errors import ClientError, UserError
from ..profiles import hardware_rows
from ..settings_api import apply_settings
from ..spend import spend_summary
from ..statuspage import replicate_status
from .models import SettingsChanges, SpendLimitBody, TokenBody
from .state import State, StateDep

router = APIRouter(prefix="/api/cloud", tags=["provider"])
REPLICATE = "/providers/replicate"


def _save_settings(state: State, changes: dict[str, Any]) -> dict:
    try:
        updated = apply_settings(state.settings(), changes)
    except ValueError as exc:
        raise UserError(str(exc), 422) from None
    updated.save(state.root)
    return {"settings": asdict(updated)}


@router.get(REPLICATE)
def provider_settings(state: StateDep) -> dict:
    s = state.settings()
    return {"settings": asdict(s), "token": tokens.status(state.root), "webhook_url": s.webhook_url()}


@router.put(REPLICATE)
def put_provider_settings(state: StateDep, changes: SettingsChanges) -> dict:
    return _save_settings(state, changes.model_dump(exclude_unset=True))


@router.get(REPLICATE + "/validate")
def validate(state: StateDep) -> dict:
    """Whether the token works (and whose account it is); a problem is an answer, not an error."""
    status = tokens.status(state.root)
    try:
        account = state.replicate().account()
    except ClientError as exc:
        return {"ok": False, "problem": str(exc), "token": status}
    return {"ok": True, "account": account, "token": status}


@router.get(REPLICATE + "/versions")
def versions(state: StateDep) -> dict:
    p = state.replicate()
    return {"model": p.model, "pinned": p.pinned_version, "versions": p.versions()}


@router.get(REPLICATE + "/hardware")
def hardware(state: StateDep) -> list[dict]:
    """Prices, and the trainer model each SKU's jobs go to (its profile)."""
    return hardware_rows(state.settings())


@router.get(REPLICATE + "/billing")
def billing(state: StateDep) -> dict:
    s = state.settings()
    return {
        "balance": None,
        "balance_available": False,
        "balance_note": "Replicate has no public balance endpoint",
        "prices_usd_per_hour": {k: v[1] for k, v in pricing.HARDWARE.items()},
        "local_spend_usd": spend_summary(state.store),
        "spend_limit": s.spend_limit,
    }


@router.put(REPLICATE + "/token")
def put_token(state: StateDep, body: TokenBody) -> dict:
    try:
        tokens.save(body.token, state.root)
    except tokens.TokenError as exc:
        if exc.kind == "restart_needed":
            return {"saved": True, "warning": str(exc), "token": tokens.status(state.root)}
        raise UserError(str(exc), 422) from None  # the value sent is the problem
    state.forget_secret()
    return {"saved": True, "token": tokens.status(state.root)}


@router.delete(REPLICATE + "/token")
def delete_token(state: StateDep) -> dict:
    return {"deleted": tokens.delete(state.root), "token": tokens.status(state.root)}


@router.get("/spend-limit")
def get_spend_limit(state: StateDep) -> dict:
    return {"spend_limit": state.settings().spend_limit}


@router.put("/spend-limit")
def put_spend_limit(state: StateDep, body: SpendLimitBody | None = Body(None)) -> dict:
    """Set the limit; ``null`` (or no body) removes it."""
    return _save_settings(state, {"spend_limit": body.model_dump() if body else None})


@router.get("/status")
def status_page() -> dict:
    return replicate_status()
