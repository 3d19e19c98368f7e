"""What the server's routes and its background threads share: the job store, the providers, the
webhook verifier, the deliveries in flight. Routes get it with ``StateDep``."""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from train.progress import publish_failure

from .. import token as tokens
from ..config import Settings, home, load_secrets, store_path
from ..errors import UserError
from ..jobs import deliver_job
from ..providers import CogProvider, Provider, ReplicateProvider
from ..records import Job
from ..security import Policy, Sessions
from ..store import JobStore
from ..webhooks import WebhookVerifier

API_KEY_SECRET = "server_api_key_sha256"


class State:
    """One server's state; settings are re-read on every use, so a PUT takes effect at once."""

    def __init__(
        self, root: Path | None = None, base_url: str | None = None, host: str = "127.0.0.1", port: int = 8080
    ):
        self.root = root or home()
        self.store = JobStore(store_path(self.root))
        self.base_url = base_url or os.environ.get("REPLICATE_BASE_URL") or None
        self.cog_hook_key = secrets.token_urlsafe(24)
        self.host, self.port = host, port
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.local_url = f"http://{shown}:{port}"
        self.sessions = Sessions()
        self.cog: dict[str, CogProvider] = {}
        self._secret: str | None = None
        # one verifier: it caches the signing secret and rate-limits refreshes after bad signatures
        self.verifier = WebhookVerifier(self.webhook_secret)
        self.lock = threading.Lock()
        self.delivering: set[str] = set()
        self.next_poll: dict[str, tuple[float, float]] = {}  # job id -> (due, interval)
        self.stop = threading.Event()

    def settings(self) -> Settings:
        return Settings.load(self.root)

    def policy(self) -> Policy:
        s = self.settings()
        return Policy(
            self.host, self.port, s.public_url, s.allowed_hosts, load_secrets(self.root).get(API_KEY_SECRET)
        )

    def replicate(self) -> ReplicateProvider:
        tok = tokens.resolve(self.root)  # a TokenError is a UserError: 401 when none is set
        s = self.settings()
        return ReplicateProvider(tok.value, model=s.model, version=s.version, base_url=self.base_url)

    def cog_provider(self, url: str | None) -> CogProvider:
        url = url or self.settings().cog_url
        if not url:
            raise UserError("provider cog needs cog_url (PUT /api/cloud/providers/replicate or the request)")
        with self.lock:
            if url not in self.cog:
                self.cog[url] = CogProvider(url)
            return self.cog[url]

    def provider_for(self, rec: Job) -> Provider:
        if rec["provider"] == "cog":
            for p in self.cog.values():
                if rec["id"] in p.jobs:
                    return p
            raise UserError(f"job {rec['id']} ran on a Cog server this server process did not start", 409)
        return self.replicate()

    def webhook_secret(self, refresh: bool) -> str:
        secret = self._secret
        if refresh or secret is None:
            secret = self._secret = str(self.replicate().client.webhooks.default.secret().key)
        return secret

    def forget_secret(self) -> None:
        """A new token may belong to another account: fetch its signing secret next time."""
        self._secret = None

    def apply(self, job_id: str, obj: dict, source: str) -> tuple[Job, bool]:
        """Merge a job object (webhook or poll) into the store; a success starts its delivery."""
        rec, changed = self.store.apply_remote(job_id, obj, source)
        assert rec is not None, f"{job_id} is in the store"  # callers check before applying
        if rec["status"] == "succeeded" and not rec.get("delivered"):
            self.deliver_async(rec["id"])
        return rec, changed

    def deliver_async(self, job_id: str) -> None:
        """Download a succeeded job's outputs in the background, once at a time per job."""
        with self.lock:
            if job_id in self.delivering:
                return
            self.delivering.add(job_id)
        threading.Thread(target=self._deliver, args=(job_id,), daemon=True).start()

    def _deliver(self, job_id: str) -> None:
        try:
            rec = self.store.get(job_id)
            assert rec is not None
            deliver_job(self.store, rec, root=self.root)
        except Exception as exc:  # noqa: BLE001 - recorded on the job; `download` retries by hand
            self.store.update(job_id, error=f"delivery failed: {exc}")
        finally:
            with self.lock:
                self.delivering.discard(job_id)


def current_state(request: Request) -> State:
    return request.app.state.trainer


StateDep = Annotated[State, Depends(current_state)]


def public_record(rec: Job | None) -> dict | None:
    """A job record for API responses: no internal columns, JSON columns decoded."""
    if rec is None:
        return None
    out: dict[str, Any] = dict(rec)
    out.pop("input_json", None)
    for key in ("output_json", "spec_json"):
        if out.get(key):
            try:
                out[key.removesuffix("_json")] = json.loads(out.pop(key))
            except (TypeError, ValueError):
                pass
    out["input_images"] = _input_images(out.get("spec"))
    out["publish_failed"] = publish_failure(rec.get("logs_tail"))  # the job succeeded; its weights are kept
    return out


def _input_images(spec: Any) -> dict[str, Any]:
    """What the job's model takes at the run entry (the page's "try it" box offers fields for it):
    ``max`` input images (0: none), whether one is ``required`` (an edit or image-to-video model) and
    is a ``first_frame`` to animate; a video model's ``frames``: the counts it renders (``step``k+1 up
    to ``max``)."""
    from train.families import MODELS

    info = MODELS.get(spec.get("model", "")) if isinstance(spec, dict) else None
    if info is None:
        return {"max": 0, "required": False, "first_frame": False, "frames": None}
    frames = {"step": info.frame_step, "max": info.max_frames} if info.video else None
    return {
        "max": info.run_images,
        "required": info.run_image_required,
        "first_frame": info.image_to_video,
        "frames": frames,
    }


def job_or_404(state: State, job_id: str) -> Job:
    rec = state.store.get(job_id)
    if rec is None:
        raise UserError(f"no job {job_id}", 404)
    return rec
