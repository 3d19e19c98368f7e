"""`advanced-trainer serve`: the REST API (for tools and the web page) and the webhook receiver.

Jobs live in the SQLite store; webhooks and a background poller both feed
``JobStore.apply_remote`` (events may arrive in any order, any number of times). The poller
follows every unfinished job that has no webhooks flowing: jobs submitted without a public URL,
and jobs whose webhooks stopped. Succeeded jobs are delivered to cloud_outputs/<id>/.
The OpenAPI document is at /openapi.json (and /docs).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from . import pricing
from . import token as tokens
from .config import Settings, home, store_path
from .providers import TERMINAL, CogProvider, ProviderError, RemoteUserError, ReplicateProvider
from .store import JobStore

API_KEY_SECRET = "server_api_key_sha256"
WEB = Path(__file__).resolve().parent / "web"
POLL_QUIET_S = 60.0        # poll a job whose webhooks have been silent this long
POLL_MIN_S, POLL_MAX_S = 2.0, 30.0


class State:
    """What the app shares between requests and its background threads."""

    def __init__(self, root: Path | None = None, base_url: str | None = None, host: str = "127.0.0.1",
                 port: int = 8080):
        import os

        self.root = root or home()
        self.store = JobStore(store_path(self.root))
        self.base_url = base_url or os.environ.get("REPLICATE_BASE_URL") or None
        self.cog_hook_key = secrets.token_urlsafe(24)
        self.host, self.port = host, port
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.local_url = f"http://{shown}:{port}"
        from .security import Sessions

        self.sessions = Sessions()
        self.cog: dict[str, CogProvider] = {}
        self._secret: str | None = None
        from .webhooks import WebhookVerifier

        # one verifier: it caches the signing secret and rate-limits refreshes after bad signatures
        self.verifier = WebhookVerifier(self.webhook_secret)
        self.lock = threading.Lock()
        self.delivering: set[str] = set()
        self.next_poll: dict[str, tuple[float, float]] = {}  # job id -> (due, interval)
        self.stop = threading.Event()

    def settings(self) -> Settings:
        return Settings.load(self.root)

    def policy(self):
        from .config import load_secrets
        from .security import Policy

        s = self.settings()
        return Policy(self.host, self.port, s.public_url, s.allowed_hosts,
                      load_secrets(self.root).get(API_KEY_SECRET))

    def replicate(self) -> ReplicateProvider:
        try:
            tok = tokens.resolve(self.root)
        except tokens.TokenError as exc:
            raise HTTPException(400 if exc.kind != "not_set" else 401, str(exc)) from None
        s = self.settings()
        return ReplicateProvider(tok.value, model=s.model, version=s.version, base_url=self.base_url)

    def cog_provider(self, url: str | None) -> CogProvider:
        url = url or self.settings().cog_url
        if not url:
            raise HTTPException(400, "provider cog needs cog_url (PUT /api/cloud/providers/cog or the request)")
        with self.lock:
            if url not in self.cog:
                self.cog[url] = CogProvider(url)
            return self.cog[url]

    def provider_for(self, rec: dict):
        if rec["provider"] == "cog":
            for p in self.cog.values():
                if rec["id"] in p.jobs:
                    return p
            raise HTTPException(409, f"job {rec['id']} ran on a Cog server this server process did not start")
        return self.replicate()

    def webhook_secret(self, refresh: bool) -> str:
        if refresh or self._secret is None:
            self._secret = self.replicate().client.webhooks.default.secret().key
        return self._secret


# What the page's "try it" box may send to the run entry (its Cog inputs), with their JSON types.
RUN_INPUTS: dict[str, Any] = {
    "prompt": str, "negative_prompt": str, "aspect_ratio": str, "width": int, "height": int, "num_outputs": int,
    "num_inference_steps": int, "guidance_scale": (int, float), "seed": int, "lora_scale": (int, float),
    "output_format": str,
}


def _error(exc: Exception) -> HTTPException:
    if isinstance(exc, HTTPException):
        return exc
    from .jobs import UserError

    if isinstance(exc, UserError):
        return HTTPException(400, str(exc))
    if isinstance(exc, RemoteUserError):
        return HTTPException(exc.status if exc.status in (401, 402, 404, 413, 422) else 400, str(exc))
    if isinstance(exc, ProviderError):
        return HTTPException(502, str(exc))
    raise exc


def _problems(exc) -> list[dict]:
    """A SpecError's lines as [{"field", "message"}] for the page."""
    return [{"field": p.split(":", 1)[0], "message": p.split(":", 1)[1].strip() if ":" in p else p}
            for p in exc.problems]


def _public(rec: dict | None) -> dict | None:
    """A job record for API responses (no internal columns)."""
    if rec is None:
        return None
    out = dict(rec)
    for key in ("input_json",):
        out.pop(key, None)
    for key in ("output_json", "spec_json"):
        if out.get(key):
            try:
                out[key.removesuffix("_json")] = json.loads(out.pop(key))
            except (TypeError, ValueError):
                pass
    return out


def create_app(state: State) -> FastAPI:
    # /docs would load Swagger UI from a CDN (no network, and against the CSP); /openapi.json stays.
    app = FastAPI(title="advanced-trainer", version="0.1.0", docs_url=None, redoc_url=None,
                  description="Submit and track training jobs; receives Replicate's signed webhooks.")
    from .security import SecurityMiddleware

    app.add_middleware(SecurityMiddleware, policy=state.policy, sessions=state.sessions)

    # -- the page ----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.get("/static/{name:path}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        path = (WEB / name).resolve()
        if not path.is_relative_to(WEB.resolve()) or not path.is_file():
            raise HTTPException(404, "not found")
        return FileResponse(path)

    @app.post("/api/session", status_code=204)
    def login(response: Response, body: dict[str, Any] = Body(...)) -> None:
        from .security import SESSION_COOKIE, hash_key

        policy = state.policy()
        key = body.get("api_key")
        if not policy.api_key_hash or not isinstance(key, str) or \
                not secrets.compare_digest(hash_key(key), policy.api_key_hash):
            raise HTTPException(401, "wrong API key")
        response.set_cookie(SESSION_COOKIE, state.sessions.new(), httponly=True, samesite="strict",
                            secure=False, path="/")

    # -- helpers for the page ------------------------------------------------------------------------
    @app.post("/api/cloud/spec/validate")
    def validate_spec(body: dict[str, Any] = Body(...)) -> dict:
        from train.spec import SpecError, parse_spec

        try:
            spec = parse_spec(body.get("spec") or {})
        except SpecError as exc:
            raise HTTPException(422, {"problems": _problems(exc)}) from None
        return {"ok": True, "spec": json.loads(spec.to_json())}

    @app.post("/api/cloud/estimate")
    def estimate(body: dict[str, Any] = Body(...)) -> dict:
        from train.spec import SpecError, parse_spec

        try:
            spec = parse_spec(body.get("spec") or {})
        except SpecError as exc:
            raise HTTPException(422, {"problems": _problems(exc)}) from None
        skus = [body["hardware"]] if body.get("hardware") else ["gpu-l40s", "gpu-a100-large", "gpu-h100"]
        out = []
        for sku in skus:
            try:
                est = pricing.estimate(spec, sku, int(body.get("images") or 20))
            except pricing.UnknownHardware as exc:
                raise HTTPException(422, str(exc)) from None
            out.append({"hardware": sku, "seconds": round(est.seconds), "usd": round(est.usd, 4),
                        "description": est.describe()})
        return {"estimates": out}

    @app.post("/api/cloud/datasets", status_code=201)
    async def upload_dataset(request: Request) -> dict:
        """A dataset zip uploaded by the page (multipart field ``file``), kept under the state folder."""
        form = await request.form()
        upload = form.get("file")
        if upload is None or not hasattr(upload, "read"):
            raise HTTPException(422, "file: attach the dataset zip as the multipart field 'file'")
        folder = state.root / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{secrets.token_hex(8)}.zip"
        size = 0
        with open(target, "wb") as f:
            while chunk := await upload.read(1 << 20):
                f.write(chunk)
                size += len(chunk)
        from .jobs import UPLOAD_LIMIT

        return {"path": str(target), "bytes": size, "limit_bytes": UPLOAD_LIMIT, "over_limit": size > UPLOAD_LIMIT}

    @app.post("/api/cloud/datasets/inspect")
    def inspect_dataset(body: dict[str, Any] = Body(...)) -> dict:
        from .jobs import UPLOAD_LIMIT
        from .pack import PackError, inspect_folder

        path = Path(str(body.get("path") or ""))
        if not path.exists():
            raise HTTPException(422, f"path: {path} does not exist on this machine")
        if path.is_file():
            size = path.stat().st_size
            return {"kind": "zip", "bytes": size, "images": None, "limit_bytes": UPLOAD_LIMIT,
                    "over_limit": size > UPLOAD_LIMIT, "largest": []}
        try:
            info = inspect_folder(path)
        except PackError as exc:
            raise HTTPException(422, f"path: {exc}") from None
        return {"kind": "folder", "limit_bytes": UPLOAD_LIMIT, "over_limit": info["bytes"] > UPLOAD_LIMIT, **info}

    # -- provider --------------------------------------------------------------------------------
    @app.get("/api/cloud/providers/replicate")
    def provider_settings() -> dict:
        s = state.settings()
        return {"settings": asdict(s), "token": tokens.status(state.root), "webhook_url": s.webhook_url()}

    @app.put("/api/cloud/providers/replicate")
    def put_provider_settings(changes: dict[str, Any] = Body(...)) -> dict:
        from .settings_api import apply_settings

        try:
            updated = apply_settings(state.settings(), changes)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        updated.save(state.root)
        return {"settings": asdict(updated)}

    @app.get("/api/cloud/providers/replicate/validate")
    def validate() -> dict:
        status = tokens.status(state.root)
        try:
            account = state.replicate().account()
        except HTTPException as exc:
            return {"ok": False, "problem": exc.detail, "token": status}
        except ProviderError as exc:
            return {"ok": False, "problem": str(exc), "token": status}
        return {"ok": True, "account": account, "token": status}

    @app.get("/api/cloud/providers/replicate/versions")
    def versions() -> dict:
        try:
            p = state.replicate()
            return {"model": p.model, "pinned": p.pinned_version, "versions": p.versions()}
        except Exception as exc:  # noqa: BLE001
            raise _error(exc) from None

    @app.get("/api/cloud/providers/replicate/hardware")
    def hardware() -> list[dict]:
        return [{"sku": k, "name": v[0], "usd_per_hour": v[1], "gpus": v[2]} for k, v in pricing.HARDWARE.items()]

    @app.get("/api/cloud/providers/replicate/billing")
    def billing() -> dict:
        from .cli import _spend_summary

        s = state.settings()
        return {"balance": None, "balance_available": False,
                "balance_note": "Replicate has no public balance endpoint",
                "prices_usd_per_hour": {k: v[1] for k, v in pricing.HARDWARE.items()},
                "local_spend_usd": _spend_summary(state.store, s), "spend_limit": s.spend_limit}

    @app.put("/api/cloud/providers/replicate/token")
    def put_token(body: dict[str, Any] = Body(...)) -> dict:
        value = body.get("token")
        if not isinstance(value, str):
            raise HTTPException(422, "token: expected a string")
        try:
            tokens.save(value, state.root)
        except tokens.TokenError as exc:
            if exc.kind == "restart_needed":
                return {"saved": True, "warning": str(exc), "token": tokens.status(state.root)}
            raise HTTPException(422, str(exc)) from None
        state._secret = None
        return {"saved": True, "token": tokens.status(state.root)}

    @app.delete("/api/cloud/providers/replicate/token")
    def delete_token() -> dict:
        return {"deleted": tokens.delete(state.root), "token": tokens.status(state.root)}

    @app.get("/api/cloud/spend-limit")
    def get_spend_limit() -> dict:
        return {"spend_limit": state.settings().spend_limit}

    @app.put("/api/cloud/spend-limit")
    def put_spend_limit(body: dict[str, Any] | None = Body(None)) -> dict:
        return put_provider_settings({"spend_limit": body})

    @app.get("/api/cloud/status")
    def status_page() -> dict:
        from .statuspage import replicate_status

        return replicate_status()

    # -- jobs ------------------------------------------------------------------------------------
    @app.post("/api/cloud/jobs/submit", status_code=201)
    def submit_job(body: dict[str, Any] = Body(...)) -> dict:
        from train.spec import SpecError, parse_spec

        from .jobs import submit

        try:
            spec = parse_spec(body.get("spec") or {}, **(body.get("overrides") or {}))
        except SpecError as exc:
            raise HTTPException(422, {"problems": _problems(exc)}) from None
        try:
            dataset = body.get("dataset")
            if not isinstance(dataset, str):
                raise HTTPException(422, "dataset: a path on this machine (a folder or a zip)")
            s = state.settings()
            if body.get("provider", "replicate") == "cog":
                provider = state.cog_provider(body.get("cog_url"))
                webhook = f"{state.local_url}/api/webhooks/cog/{state.cog_hook_key}"
            else:
                provider = state.replicate()
                webhook = s.webhook_url()
            sub = submit(state.store, provider, s, spec, Path(dataset), hardware=body.get("hardware"),
                         destination=body.get("destination"), webhook=webhook, fit=bool(body.get("fit")),
                         log=lambda m: None)
        except Exception as exc:  # noqa: BLE001
            raise _error(exc) from None
        return {"job": _public(sub.record), "estimate_usd": round(sub.estimate.usd, 4), "warnings": sub.warnings}

    @app.get("/api/cloud/jobs")
    def list_jobs(limit: int = 50, status: str | None = None) -> dict:
        return {"jobs": [_public(r) for r in state.store.list(limit=min(limit, 500), status=status)]}

    @app.get("/api/cloud/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        rec = state.store.get(job_id)
        if rec is None:
            raise HTTPException(404, f"no job {job_id}")
        return {"job": _public(rec)}

    @app.post("/api/cloud/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict:
        rec = state.store.get(job_id)
        if rec is None:
            raise HTTPException(404, f"no job {job_id}")
        try:
            obj = state.provider_for(rec).cancel(rec["kind"], job_id)
        except Exception as exc:  # noqa: BLE001
            raise _error(exc) from None
        merged = state.store.apply_remote(job_id, obj, "poll")
        return {"job": _public(merged[0] if isinstance(merged, tuple) else merged)}

    @app.post("/api/cloud/jobs/{job_id}/run")
    def try_job(job_id: str, body: dict[str, Any] = Body(...)) -> dict:
        """Render with a succeeded training's weights: on Replicate a prediction on the destination's
        new version; the images land in cloud_outputs/<job id>/tries/<prediction id>/."""
        from .config import outputs_dir
        from .run import resolve_target, run

        rec = state.store.get(job_id)
        if rec is None:
            raise HTTPException(404, f"no job {job_id}")
        unknown = sorted(set(body) - set(RUN_INPUTS))
        prompt = body.get("prompt")
        problems = [{"field": k, "message": "unknown input"} for k in unknown]
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 4000:
            problems.append({"field": "prompt", "message": "a prompt of 1 to 4000 characters is required"})
        for k, kind in RUN_INPUTS.items():
            if k in body and body[k] is not None and not isinstance(body[k], kind):
                problems.append({"field": k, "message": f"expected {kind.__name__ if isinstance(kind, type) else 'a number'}"})
        if problems:
            raise HTTPException(422, {"problems": problems})
        folder = outputs_dir(state.root) / job_id
        try:
            target = resolve_target(state.store, job_id)
            if target.provider == "cog":
                url = state.settings().cog_run_url
                if not url:
                    raise HTTPException(400, "trying a Cog job needs cog_run_url: a Cog server in run mode "
                                             "(PUT /api/cloud/providers/replicate {\"cog_run_url\": ...})")
                provider = state.cog_provider(url)
            else:
                provider = state.replicate()
            result = run(provider, target, {k: v for k, v in body.items() if v is not None},
                         lambda pred_id: folder / "tries" / pred_id)
        except Exception as exc:  # noqa: BLE001
            raise _error(exc) from None
        if not rec.get("local_dir"):
            state.store.update(job_id, local_dir=str(folder))
        base = Path(rec.get("local_dir") or folder)
        images = [p.relative_to(base).as_posix() for p in result.images]
        return {"id": result.prediction.get("id"), "status": result.prediction.get("status"),
                "predict_time": (result.prediction.get("metrics") or {}).get("predict_time"),
                "images": [{"path": p, "url": f"/api/cloud/jobs/{job_id}/files/{p}"} for p in images]}

    @app.get("/api/cloud/jobs/{job_id}/files")
    def job_files(job_id: str) -> dict:
        rec = state.store.get(job_id)
        if rec is None:
            raise HTTPException(404, f"no job {job_id}")
        folder = Path(rec["local_dir"]) if rec.get("local_dir") else None
        if folder is None or not folder.is_dir():
            return {"files": [], "delivered": False}
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return {"delivered": True, "files": [
            {"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size,
             "url": f"/api/cloud/jobs/{job_id}/files/{p.relative_to(folder).as_posix()}"} for p in files]}

    @app.get("/api/cloud/jobs/{job_id}/files/{name:path}")
    def job_file(job_id: str, name: str) -> FileResponse:
        rec = state.store.get(job_id)
        if rec is None or not rec.get("local_dir"):
            raise HTTPException(404, f"no delivered outputs for {job_id}")
        folder = Path(rec["local_dir"]).resolve()
        path = (folder / name).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise HTTPException(404, f"no file {name}")
        return FileResponse(path)

    @app.get("/api/cloud/jobs/{job_id}/logs")
    def job_logs(job_id: str) -> dict:
        rec = state.store.get(job_id)
        if rec is None:
            raise HTTPException(404, f"no job {job_id}")
        logs = rec.get("logs_tail") or ""
        if rec["status"] not in TERMINAL or not logs:
            try:
                obj = state.provider_for(rec).get(rec["kind"], job_id)
                state.store.apply_remote(job_id, obj, "poll")
                logs = obj.get("logs") or logs
            except Exception:  # noqa: BLE001 - fall back to what the store holds
                pass
        return {"id": job_id, "logs": logs}

    # -- webhooks ----------------------------------------------------------------------------------
    @app.post("/api/webhooks/replicate")
    async def replicate_webhook(request: Request):
        from .webhooks import WebhookRejected, authenticate, check_content_length

        s = state.settings()
        try:
            check_content_length(request.headers)
            body = await request.body()
            webhook_id = authenticate(request.client.host if request.client else "", request.headers, body,
                                      verifier=state.verifier, allowed=s.webhook_allowed_ips,
                                      trusted_proxies=s.trusted_proxies)
        except WebhookRejected as exc:
            return JSONResponse({"detail": exc.reason}, status_code=exc.status)
        payload = json.loads(body)
        job_id = payload.get("id")
        if not job_id or state.store.get(job_id) is None:
            # 404 makes Replicate retry the completed event: the job may not be recorded yet.
            return JSONResponse({"detail": f"unknown job {job_id}"}, status_code=404)
        if state.store.seen_webhook(webhook_id):
            return {"ok": True, "duplicate": True}
        try:
            rec, _ = _apply(state, job_id, payload, "webhook")
        except Exception:
            state.store.forget_webhook(webhook_id)  # let Replicate's retry through
            raise
        return {"ok": True, "status": rec["status"]}

    @app.post("/api/webhooks/cog/{key}")
    async def cog_webhook(key: str, request: Request):
        if not secrets.compare_digest(key, state.cog_hook_key):
            return JSONResponse({"detail": "unknown webhook key"}, status_code=403)
        payload = json.loads(await request.body())
        job_id = payload.get("id")
        for p in state.cog.values():
            p.apply_webhook(payload)
        if job_id and state.store.get(job_id) is not None:
            _apply(state, job_id, payload, "webhook")
        return {"ok": True}

    return app


def _apply(state: State, job_id: str, obj: dict, source: str) -> tuple[dict, bool]:
    merged = state.store.apply_remote(job_id, obj, source)
    rec, changed = merged if isinstance(merged, tuple) else (merged, True)
    if rec["status"] == "succeeded" and not rec.get("delivered"):
        _deliver_async(state, rec)
    return rec, changed


def _deliver_async(state: State, rec: dict) -> None:
    from .jobs import deliver_job

    with state.lock:
        if rec["id"] in state.delivering:
            return
        state.delivering.add(rec["id"])

    def run():
        try:
            deliver_job(state.store, state.store.get(rec["id"]), root=state.root)
        except Exception as exc:  # noqa: BLE001 - recorded on the job; `download` retries by hand
            state.store.update(rec["id"], error=f"delivery failed: {exc}")
        finally:
            with state.lock:
                state.delivering.discard(rec["id"])

    threading.Thread(target=run, daemon=True).start()


def poll_once(state: State, now: float | None = None) -> int:
    """Poll the unfinished jobs that are due; returns how many were polled."""
    now = time.time() if now is None else now
    polled = 0
    for rec in state.store.unfinished():
        if rec["status"] == "submitting":
            continue
        last = rec.get("last_event_at")
        if rec.get("webhook") and last:
            from .jobs import _ts

            if now - _ts(last) < POLL_QUIET_S:
                continue
        due, interval = state.next_poll.get(rec["id"], (0.0, POLL_MIN_S))
        if now < due:
            continue
        try:
            obj = state.provider_for(rec).get(rec["kind"], rec["id"])
            _, changed = _apply(state, rec["id"], obj, "poll")
            interval = POLL_MIN_S if changed else min(POLL_MAX_S, interval * 1.5)
        except (ProviderError, HTTPException):
            interval = min(POLL_MAX_S, interval * 2)
        state.next_poll[rec["id"]] = (now + interval, interval)
        polled += 1
    for rec in state.store.list(limit=50, status="succeeded"):
        if not rec.get("delivered"):
            _deliver_async(state, rec)
    return polled


def _poller(state: State) -> None:
    while not state.stop.wait(1.0):
        try:
            poll_once(state)
        except Exception as exc:  # noqa: BLE001 - the poller must survive anything and try again
            print(f"poller: {type(exc).__name__}: {exc}", flush=True)


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "warning"):
    """uvicorn settings for the app. proxy_headers is off: uvicorn would otherwise believe
    X-Forwarded-For from loopback and hand the webhook allow-list a forged client address;
    the trusted_proxies setting (client.webhooks.client_ip) is the one place XFF is read."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, proxy_headers=False,
                          server_header=False)


def ensure_api_key(root: Path | None = None) -> str | None:
    """For a bind beyond loopback: make an API key if there is none; returns a new key (shown once)."""
    from .config import load_secrets, save_secret
    from .security import hash_key

    if load_secrets(root).get(API_KEY_SECRET):
        return None
    key = "at_" + secrets.token_urlsafe(32)
    save_secret(API_KEY_SECRET, hash_key(key), root)
    return key


def serve(host: str = "127.0.0.1", port: int = 8080) -> None:
    import uvicorn

    from .security import is_loopback

    if not is_loopback(host):
        key = ensure_api_key()
        if key:
            print(f"serving beyond loopback: every route but the webhooks needs this API key (shown once; "
                  f"only its hash is stored):\n  {key}", flush=True)
    state = State(host=host, port=port)
    app = create_app(state)
    threading.Thread(target=_poller, args=(state,), daemon=True).start()
    print(f"advanced-trainer serving on http://{host}:{port} (API docs at /docs)", flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, host, port)).run()
    finally:
        state.stop.set()


class CogHookReceiver:
    """A loopback receiver for a Cog server's (unsigned) webhooks, for `submit --wait` without `serve`."""

    def __init__(self, store: JobStore, provider: CogProvider):
        outer = self
        self.store, self.provider = store, provider

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(min(int(self.headers.get("content-length", 0)), 64 * 2**20))
                try:
                    payload = json.loads(body)
                    outer.provider.apply_webhook(payload)
                    if outer.store.get(payload.get("id", "")) is not None:
                        outer.store.apply_remote(payload["id"], payload, "webhook")
                except (ValueError, KeyError):
                    pass
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
