"""The webhook receivers: Replicate's (signed, allow-listed) and a local Cog server's (keyed URL).

Both read the raw body: the signature covers the exact bytes, so FastAPI must not parse it first.
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..webhooks import WebhookRejected, authenticate, check_content_length, parse_payload
from .models import RAW_JSON_BODY
from .state import StateDep

router = APIRouter(prefix="/api/webhooks", tags=["webhooks"])


@router.post("/replicate", openapi_extra=RAW_JSON_BODY)
async def replicate_webhook(state: StateDep, request: Request):
    """Replicate's job events. Answers 4xx for what must not be retried as is, 404 for a job not
    recorded yet (Replicate retries the completed event), 200 for a duplicate."""
    s = state.settings()
    try:
        check_content_length(request.headers)
        body = await request.body()
        webhook_id = authenticate(
            request.client.host if request.client else "",
            request.headers,
            body,
            verifier=state.verifier,
            allowed=s.webhook_allowed_ips,
            trusted_proxies=s.trusted_proxies,
        )
        payload = parse_payload(body)
    except WebhookRejected as exc:
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)
    job_id = payload.get("id")
    if not isinstance(job_id, str) or state.store.get(job_id) is None:
        return JSONResponse({"detail": f"unknown job {job_id}"}, status_code=404)
    if state.store.seen_webhook(webhook_id):
        return {"ok": True, "duplicate": True}
    try:
        rec, _ = state.apply(job_id, payload, "webhook")
    except Exception:
        state.store.forget_webhook(webhook_id)  # let Replicate's retry through
        raise
    return {"ok": True, "status": rec["status"]}


@router.post("/cog/{key}", openapi_extra=RAW_JSON_BODY)
async def cog_webhook(state: StateDep, key: str, request: Request):
    """A Cog server's (unsigned) job events, on a URL holding a key only this process knows."""
    if not secrets.compare_digest(key, state.cog_hook_key):
        return JSONResponse({"detail": "unknown webhook key"}, status_code=403)
    try:
        payload = parse_payload(await request.body())
    except WebhookRejected as exc:
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)
    job_id = payload.get("id")
    for p in state.cog.values():
        p.apply_webhook(payload)
    if isinstance(job_id, str) and state.store.get(job_id) is not None:
        state.apply(job_id, payload, "webhook")
    return {"ok": True}
