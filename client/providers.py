"""Where jobs run: Replicate (through the official ``replicate`` client) or any Cog HTTP server.

Both providers speak in Replicate-shaped job objects (``id``, ``status``, ``logs``, ``output``,
``error``, ``metrics``) so the rest of the client handles them alike. A job is a *training*
(Replicate: into a destination model, which gets a new version with the trained weights);
``predict`` then runs those weights (Replicate: a prediction on the destination; Cog: a
run-mode server, given the weights as ``lora_weights``).
"""

from __future__ import annotations

import base64
import json
import mimetypes
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx
from replicate.client import Client
from replicate.exceptions import ReplicateError

from train.http import RetryPolicy

from .errors import ProviderError, RemoteUserError, remote_error
from .records import TERMINAL

_HINTS = {
    401: " — the API token was refused: check it with `advanced-trainer validate`",
    402: " — billing is not set up on the Replicate account",
    404: " — not found (check the model name, version or destination)",
    413: " — the upload is over Replicate's 100 MiB limit: use `advanced-trainer pack --fit`",
    422: " — Replicate rejected the input",
    429: " — rate limited; try again shortly",
}


class Provider(Protocol):
    """What the submit flow, the poller and `run` need from wherever jobs run.

    Every method answers with Replicate-shaped job objects (plain dicts) and raises
    ``ProviderError`` (``RemoteUserError`` when the user can fix the cause).
    """

    name: str

    def account(self) -> dict[str, Any]: ...
    def hardware(self) -> list[dict[str, Any]]: ...
    def versions(self) -> list[dict[str, Any]]: ...
    def resolve_version(self) -> str: ...
    def upload(self, path: Path) -> str: ...
    def ensure_destination(self, destination: str, hardware: str) -> bool: ...

    def create(
        self,
        kind: str,
        version: str,
        inputs: dict,
        webhook: str | None,
        events: list[str],
        destination: str | None = None,
    ) -> dict[str, Any]: ...

    def predict(self, ref: str, inputs: dict[str, Any]) -> dict[str, Any]: ...
    def get(self, kind: str, job_id: str) -> dict[str, Any]: ...
    def cancel(self, kind: str, job_id: str) -> dict[str, Any]: ...


def _from_replicate_error(exc: Exception, doing: str) -> ProviderError:
    if isinstance(exc, ReplicateError):
        status = exc.status
        detail = exc.detail or exc.title or "no detail"
        return remote_error(f"{doing} failed: HTTP {status}: {detail}{_HINTS.get(status or 0, '')}", status)
    if isinstance(exc, httpx.HTTPError):
        return ProviderError(f"{doing} failed: cannot reach the API ({type(exc).__name__}: {exc})")
    return ProviderError(f"{doing} failed: {type(exc).__name__}: {exc}")


def _files_as_data_uris(inputs: dict[str, Any]) -> dict[str, Any]:
    """File inputs (a ``Path``, or a list of them) as ``data:`` URIs, which a Cog server reads
    (the replicate client uploads ``Path`` values itself)."""

    def encode(value: Any) -> Any:
        if isinstance(value, Path):
            mime = mimetypes.guess_type(value.name)[0] or "application/octet-stream"
            return f"data:{mime};base64," + base64.b64encode(value.read_bytes()).decode()
        if isinstance(value, list):
            return [encode(v) for v in value]
        return value

    return {k: encode(v) for k, v in inputs.items()}


def plain_dict(obj: Any) -> dict:
    """A replicate resource (pydantic v1 model) as a plain dict of the API's fields."""
    if isinstance(obj, dict):
        return obj
    data = obj.dict() if hasattr(obj, "dict") else dict(obj)
    for key in ("created_at", "started_at", "completed_at"):
        if data.get(key) is not None and not isinstance(data[key], str):
            data[key] = data[key].isoformat()
    return json.loads(json.dumps(data, default=str))


class ReplicateProvider:
    name = "replicate"

    def __init__(self, token: str, model: str, version: str | None = None, base_url: str | None = None):
        self.model = model
        self.pinned_version = version
        self.client = Client(api_token=token, base_url=base_url)

    def _call(self, doing: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # the replicate client raises ReplicateError or raw httpx errors
            raise _from_replicate_error(exc, doing) from None

    def account(self) -> dict:
        return self._call("GET /v1/account", lambda: plain_dict(self.client.accounts.current()))

    def hardware(self) -> list[dict]:
        return self._call("GET /v1/hardware", lambda: [plain_dict(h) for h in self.client.hardware.list()])

    def versions(self) -> list[dict]:
        def go():
            model = self.client.models.get(self.model)
            return [
                {"id": v.id, "created_at": str(v.created_at), "cog_version": v.cog_version}
                for v in model.versions.list()
            ]

        return self._call(f"list versions of {self.model}", go)

    def resolve_version(self) -> str:
        if self.pinned_version:
            return self.pinned_version
        versions = self.versions()
        if not versions:
            raise RemoteUserError(
                f"{self.model} has no versions yet: push one with `cog push r8.im/{self.model}`"
            )
        return versions[0]["id"]

    def upload(self, path: Path) -> str:
        def go():
            with open(path, "rb") as f:
                return self.client.files.create(f, filename=path.name, content_type="application/zip")

        return self._call(f"upload {path.name}", go).urls["get"]

    def ensure_destination(self, destination: str, hardware: str) -> bool:
        """Create ``owner/name`` (private) when it does not exist; True when created."""
        owner, name = destination.split("/", 1)
        try:
            self.client.models.get(destination)
            return False
        except ReplicateError as exc:
            if exc.status != 404:
                raise _from_replicate_error(exc, f"look up {destination}") from None
        self._call(
            f"create model {destination}",
            lambda: self.client.models.create(
                owner=owner,
                name=name,
                visibility="private",
                hardware=hardware,
                description="LoRA weights trained with advanced-trainer",
            ),
        )
        return True

    def create(
        self,
        kind: str,
        version: str,
        inputs: dict,
        webhook: str | None,
        events: list[str],
        destination: str | None = None,
    ) -> dict:
        assert kind == "training" and destination, "jobs are trainings into a destination model"
        kw: dict[str, Any] = {"input": inputs}
        if webhook:
            kw.update(webhook=webhook, webhook_events_filter=events)
        return self._call(
            "create training",
            lambda: plain_dict(
                self.client.trainings.create(model=self.model, version=version, destination=destination, **kw)
            ),
        )

    def predict(self, ref: str, inputs: dict, timeout: float = 900, poll: float = 1.0) -> dict:
        """Run ``owner/name`` (its latest version) or ``owner/name:version`` and wait for the result."""

        def create():
            if ":" in ref:
                return self.client.predictions.create(version=ref.split(":", 1)[1], input=inputs, wait=True)
            return self.client.models.predictions.create(model=ref, input=inputs, wait=True)

        obj = self._call(f"run {ref}", lambda: plain_dict(create()))
        deadline = time.monotonic() + timeout
        while obj.get("status") not in TERMINAL:
            if time.monotonic() > deadline:
                raise ProviderError(
                    f"run {ref}: prediction {obj['id']} still {obj.get('status')} after {timeout:.0f}s"
                )
            time.sleep(poll)
            obj = self.get("prediction", obj["id"])
        return obj

    def get(self, kind: str, job_id: str) -> dict:
        if kind == "training":
            # replicate 1.0.7's Training model drops ``metrics`` (predict_time: what the ledger bills),
            # so read the object as the API sends it, through the client's own request path.
            return self._call(
                f"GET training {job_id}",
                lambda: self.client._request("GET", f"/v1/trainings/{job_id}").json(),
            )
        return self._call(f"GET {kind} {job_id}", lambda: plain_dict(self.client.predictions.get(job_id)))

    def cancel(self, kind: str, job_id: str) -> dict:
        api = self.client.trainings if kind == "training" else self.client.predictions
        return self._call(f"cancel {kind} {job_id}", lambda: plain_dict(api.cancel(job_id)))


# A Cog server runs one job at a time and answers 409 while busy; the slot is released just after
# the previous job ends, so a short, steady wait (about 10 s in all) is enough.
_COG_BUSY = RetryPolicy(
    attempts=50,
    base_delay_s=0.2,
    max_delay_s=0.2,
    retryable=lambda exc: isinstance(exc, ProviderError) and exc.status == 409,
)


class CogProvider:
    """Any Cog HTTP server (a self-hosted GPU box, or the local no-Docker dev server).

    Cog has no GET for a job: it reports through webhooks. Jobs are created asynchronously
    with a webhook to the client's receiver; without one, the request runs synchronously in
    a background thread whose result is kept here, so ``get`` works either way.
    """

    name = "cog"

    def __init__(self, url: str, timeout: float = 24 * 3600):
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=10))
        self.jobs: dict[str, dict] = {}
        self.lock = threading.Lock()

    def account(self) -> dict:
        try:
            health = self.http.get("/health-check", timeout=5).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ProviderError(f"cannot reach the Cog server at {self.url}: {exc}") from None
        return {"type": "cog", "username": self.url, "name": f"Cog server ({health.get('status')})"}

    def hardware(self) -> list[dict]:
        return [{"sku": "cog", "name": f"Cog server at {self.url}"}]

    def versions(self) -> list[dict]:
        return [{"id": "local", "created_at": None, "cog_version": "local"}]

    def resolve_version(self) -> str:
        return "local"

    def upload(self, path: Path) -> str:
        return "data:application/zip;base64," + base64.b64encode(path.read_bytes()).decode()

    def ensure_destination(self, destination: str, hardware: str) -> bool:
        return False

    def create(
        self,
        kind: str,
        version: str,
        inputs: dict,
        webhook: str | None,
        events: list[str],
        destination: str | None = None,
    ) -> dict:
        assert kind == "training"
        job_id = "cog-" + uuid.uuid4().hex[:20]
        path = "/trainings"
        body: dict[str, Any] = {"id": job_id, "input": inputs}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {
            "id": job_id,
            "status": "starting",
            "logs": "",
            "output": None,
            "error": None,
            "metrics": {},
            "created_at": now,
            "input": {},
        }
        with self.lock:
            self.jobs[job_id] = record
        if webhook:
            body.update(webhook=webhook, webhook_events_filter=events)
            r = self._post(path, body, {"Prefer": "respond-async"})
            if r.status_code != 202:
                raise remote_error(
                    f"the Cog server refused the job: HTTP {r.status_code}: {r.text[:500]}", r.status_code
                )
            return dict(record)
        threading.Thread(target=self._run_sync, args=(job_id, path, body), daemon=True).start()
        return dict(record)

    def _post(self, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
        def post() -> httpx.Response:
            try:
                r = self.http.post(path, json=body, headers=headers or {})
            except httpx.HTTPError as exc:
                raise ProviderError(f"cannot reach the Cog server at {self.url}: {exc}") from None
            if r.status_code == 409:
                raise ProviderError("the Cog server is busy with another job (HTTP 409)", 409)
            if r.status_code == 422:
                raise RemoteUserError(f"the Cog server rejected the input: {r.text[:1000]}", 422)
            return r

        return _COG_BUSY.call(post)

    def _run_sync(self, job_id: str, path: str, body: dict) -> None:
        with self.lock:
            self.jobs[job_id]["status"] = "processing"
        try:
            result = self._post(path, body).json()
        except (ProviderError, ValueError) as exc:
            result = {"status": "failed", "error": str(exc)}
        with self.lock:
            self.jobs[job_id].update({k: v for k, v in result.items() if k != "id"})

    def predict(self, ref: str, inputs: dict, timeout: float | None = None) -> dict:
        """A synchronous prediction on this (run-mode) server; ``ref`` is only named in errors."""
        job_id = "cog-" + uuid.uuid4().hex[:20]
        r = self._post("/predictions", {"id": job_id, "input": _files_as_data_uris(inputs)})
        try:
            result = r.json()
        except ValueError:
            raise ProviderError(
                f"run on {self.url}: HTTP {r.status_code}: {r.text[:300]}", r.status_code
            ) from None
        if r.status_code != 200 or "status" not in result:
            raise ProviderError(f"run on {self.url}: HTTP {r.status_code}: {r.text[:300]}", r.status_code)
        return {"id": job_id, **{k: v for k, v in result.items() if k != "id"}}

    def apply_webhook(self, payload: dict) -> None:
        with self.lock:
            if payload.get("id") in self.jobs:
                self.jobs[payload["id"]].update({k: v for k, v in payload.items() if k != "id"})

    def get(self, kind: str, job_id: str) -> dict:
        with self.lock:
            if job_id not in self.jobs:
                raise RemoteUserError(f"no job {job_id} on this Cog server session", 404)
            return dict(self.jobs[job_id])

    def cancel(self, kind: str, job_id: str) -> dict:
        path = "/trainings" if kind == "training" else "/predictions"
        try:
            self.http.post(f"{path}/{job_id}/cancel", timeout=10)
        except httpx.HTTPError as exc:
            raise ProviderError(f"cannot reach the Cog server at {self.url}: {exc}") from None
        return self.get(kind, job_id)
