"""`advanced-trainer serve` against the Replicate fake (driven by the real `replicate` client):
the REST API, signed webhooks (and the ones it must refuse), polling when webhooks are absent,
injected faults, and the end-to-end flow on the real Cog server."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from fake_replicate import FakeReplicate, SyntheticRun

TOKEN = "r8_" + "T0kenValue" * 4
CREATE = "/v1/models/*/versions/*/trainings"  # every job is a training into a destination model


def sign(secret: str, webhook_id: str, ts: int, body: bytes) -> str:
    key = base64.b64decode(secret.split("_", 1)[1])
    mac = hmac.new(key, f"{webhook_id}.{ts}.{body.decode()}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class LocalServer:
    """client.server's app on a real port (uvicorn in a thread) plus its poller."""

    def __init__(
        self,
        root: Path,
        fake: FakeReplicate,
        public: bool = True,
        allowed=("127.0.0.1/32",),
        bind: str = "127.0.0.1",
    ):
        import socket

        import uvicorn

        from client import server as srv
        from client.config import Settings

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        Settings(
            public_url=self.url if public else None, webhook_allowed_ips=list(allowed), hardware="gpu-l40s"
        ).save(root)
        self.state = srv.State(root=root, base_url=fake.url, host=bind, port=self.port)
        self.app = srv.create_app(self.state)
        self.server = uvicorn.Server(srv.uvicorn_config(self.app, bind, self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.poller = threading.Thread(target=srv._poller, args=(self.state,), daemon=True)
        self.poller.start()
        self.http = httpx.Client(base_url=self.url, timeout=60)
        for _ in range(200):
            try:
                self.http.get("/openapi.json")
                break
            except httpx.HTTPError:
                time.sleep(0.05)

    def wait_job(
        self, job_id: str, statuses=("succeeded", "failed", "canceled"), timeout=60, delivered=False
    ) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            rec = self.state.store.get(job_id)
            if rec and rec["status"] in statuses and (not delivered or rec.get("delivered")):
                return rec
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id}: {self.state.store.get(job_id)}")

    def close(self) -> None:
        self.state.stop.set()
        self.server.should_exit = True
        self.thread.join(10)
        self.http.close()


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    monkeypatch.setenv("ADVANCED_TRAINER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.1")
    return tmp_path / "home"


@pytest.fixture()
def fake(env):
    with FakeReplicate(
        token=TOKEN,
        webhook_throttle_s=0.05,
        synthetic=SyntheticRun(duration_s=0.6, steps=6, predict_time=120.0),
    ) as f:
        yield f


@pytest.fixture()
def local(env, fake):
    server = LocalServer(env, fake)
    yield server
    server.close()


def _submit(local, dataset, **extra):
    r = local.http.post(
        "/api/cloud/jobs/submit",
        json={"spec": {"model": "flux-dev", "steps": 50}, "dataset": str(dataset), **extra},
    )
    return r


# -- REST API ------------------------------------------------------------------------------------------


def test_provider_endpoints_never_reveal_the_token(local, fake):
    seen = []
    r = local.http.get("/api/cloud/providers/replicate/validate")
    seen.append(r.text)
    body = r.json()
    assert (
        body["ok"]
        and body["account"]["username"] == "acme"
        and body["token"] == {"set": True, "source": "environment"}
    )
    r = local.http.get("/api/cloud/providers/replicate/versions")
    seen.append(r.text)
    assert r.json()["versions"][0]["id"] == fake.trainer_version
    r = local.http.get("/api/cloud/providers/replicate/billing")
    seen.append(r.text)
    assert r.json()["balance"] is None and r.json()["balance_available"] is False
    assert r.json()["prices_usd_per_hour"]["gpu-l40s"] == pytest.approx(3.51)
    seen.append(local.http.get("/api/cloud/providers/replicate").text)
    seen.append(local.http.get("/openapi.json").text)
    assert all(TOKEN not in text for text in seen)
    paths = json.loads(seen[-1])["paths"]
    for path in (
        "/api/cloud/providers/replicate/versions",
        "/api/cloud/providers/replicate/validate",
        "/api/cloud/providers/replicate/billing",
        "/api/cloud/providers/replicate/token",
        "/api/cloud/providers/replicate",
        "/api/cloud/jobs/submit",
        "/api/cloud/jobs",
        "/api/cloud/jobs/{job_id}",
        "/api/cloud/jobs/{job_id}/cancel",
        "/api/cloud/jobs/{job_id}/logs",
        "/api/webhooks/replicate",
        "/api/cloud/spend-limit",
    ):
        assert path in paths, path


def test_token_and_settings_endpoints(local, env, monkeypatch):
    monkeypatch.delenv("REPLICATE_API_TOKEN")
    assert local.http.get("/api/cloud/providers/replicate/validate").json()["ok"] is False
    r = local.http.put("/api/cloud/providers/replicate/token", json={"token": "r8_short"})
    assert r.status_code == 422 and "r8_short" not in r.text
    r = local.http.put("/api/cloud/providers/replicate/token", json={"token": TOKEN})
    assert r.status_code == 200 and TOKEN not in r.text and r.json()["token"]["source"] == "secrets file"
    assert local.http.get("/api/cloud/providers/replicate/validate").json()["ok"] is True
    assert local.http.delete("/api/cloud/providers/replicate/token").json()["deleted"] is True
    r = local.http.put(
        "/api/cloud/providers/replicate",
        json={"hardware": "gpu-a100-large", "public_url": "ftp://x", "webhook_allowed_ips": ["999.1.1.1"]},
    )
    assert r.status_code == 422 and "public_url" in r.text and "webhook_allowed_ips" in r.text
    r = local.http.put(
        "/api/cloud/spend-limit", json={"amount_usd": 20, "period": "weekly", "action": "warn"}
    )
    assert r.status_code == 200
    assert local.http.get("/api/cloud/spend-limit").json()["spend_limit"]["period"] == "weekly"


# -- the job flow ---------------------------------------------------------------------------------------


def test_submit_follows_signed_webhooks_to_delivery(local, fake, sample_dataset, env):
    r = _submit(local, sample_dataset)
    assert r.status_code == 201, r.text
    job_id = r.json()["job"]["id"]
    rec = local.wait_job(job_id, delivered=True)
    assert rec["status"] == "succeeded" and rec["step"] == 6 and rec["total"] == 6
    assert rec["cost_usd"] == pytest.approx(120.0 * 3.51 / 3600, rel=1e-3)  # predict_time x the L40S price
    assert (env / "cloud_outputs" / job_id / "output.zip").is_file()
    delivered = [w for w in fake.sent_webhooks if w.job_id == job_id and w.delivered]
    assert any(w.status == "succeeded" for w in delivered)
    # submitted exactly once; the token is nowhere in the store
    creates = [q for q in fake.requests if q.method == "POST" and fnmatch.fnmatch(q.path, CREATE)]
    assert len(creates) == 1
    assert TOKEN.encode() not in (env / "jobs.sqlite3").read_bytes()
    jobs = local.http.get("/api/cloud/jobs").json()["jobs"]
    assert jobs[0]["id"] == job_id and "spec" in jobs[0]
    logs = local.http.get(f"/api/cloud/jobs/{job_id}/logs").json()["logs"]
    assert "PROGRESS" in logs


def test_without_a_public_url_the_poller_follows_the_job(env, fake, sample_dataset):
    server = LocalServer(env, fake, public=False)
    try:
        job_id = _submit(server, sample_dataset).json()["job"]["id"]
        rec = server.wait_job(job_id, delivered=True, timeout=60)
        assert rec["status"] == "succeeded" and not rec["webhook"]
        assert not [w for w in fake.sent_webhooks if w.job_id == job_id]
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["drop", "duplicate", "reorder", "late"])
def test_webhook_faults_lose_no_job(local, fake, sample_dataset, monkeypatch, kind):
    from client import server as srv

    monkeypatch.setattr(srv, "POLL_QUIET_S", 1.0)  # dropped webhooks: polling resumes quickly
    fake.webhook_fault(kind, times=None if kind == "drop" else 2, delay_s=1.0)
    job_id = _submit(local, sample_dataset).json()["job"]["id"]
    rec = local.wait_job(job_id, delivered=True, timeout=90)
    assert rec["status"] == "succeeded" and rec["step"] == 6
    creates = [q for q in fake.requests if q.method == "POST" and fnmatch.fnmatch(q.path, CREATE)]
    assert len(creates) == 1


def test_cancel_through_the_api(local, fake, sample_dataset):
    fake.synthetic = SyntheticRun(duration_s=30, steps=30)
    job_id = _submit(local, sample_dataset).json()["job"]["id"]
    local.wait_job(job_id, statuses=("processing",), timeout=20)
    r = local.http.post(f"/api/cloud/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["job"]["status"] == "canceled"
    assert fake.job(job_id)["status"] == "canceled"


# -- API faults -----------------------------------------------------------------------------------------


def test_rate_limited_create_fails_clearly_and_counts_nothing(local, fake, sample_dataset):
    fake.fail(CREATE, 429, method="POST", retry_after="0")
    r = _submit(local, sample_dataset)
    assert r.status_code == 502 and "429" in r.json()["detail"] and "rate limited" in r.json()["detail"]
    recs = local.state.store.list(limit=10)
    assert len(recs) == 1 and recs[0]["status"] == "failed"  # the reservation was released, not left counting
    assert local.state.store.spend_between() == 0
    r = _submit(local, sample_dataset)  # and the next try works
    assert r.status_code == 201


def test_server_errors_on_polls_are_retried(env, fake, sample_dataset):
    server = LocalServer(env, fake, public=False)
    try:
        fake.fail("/v1/trainings/*", 503, method="GET", times=3, retry_after="0")
        job_id = _submit(server, sample_dataset).json()["job"]["id"]
        assert server.wait_job(job_id, timeout=60)["status"] == "succeeded"
    finally:
        server.close()


def test_dropped_connection_on_create_never_submits_twice(local, fake, sample_dataset):
    fake.drop(CREATE, method="POST")
    r = _submit(local, sample_dataset)
    assert r.status_code == 502 and "cannot reach the API" in r.json()["detail"]
    creates = [q for q in fake.requests if q.method == "POST" and fnmatch.fnmatch(q.path, CREATE)]
    assert len(creates) == 1  # no automatic resubmission


def test_archive_over_the_upload_limit_gets_a_clear_message(env, sample_dataset):
    with FakeReplicate(token=TOKEN, max_file_size=1000) as fake:
        server = LocalServer(env, fake)
        try:
            r = _submit(server, sample_dataset)
            assert r.status_code == 413 and "100 MiB" in r.json()["detail"] and "--fit" in r.json()["detail"]
        finally:
            server.close()


# -- webhook security -------------------------------------------------------------------------------------


def _job_and_hook(local, fake, sample_dataset):
    job_id = _submit(local, sample_dataset).json()["job"]["id"]
    local.wait_job(job_id, delivered=True)  # the download changes the record too: let it finish first
    return job_id, fake.job(job_id)


def test_forged_tampered_replayed_expired_and_foreign_webhooks_change_nothing(local, fake, sample_dataset):
    job_id, obj = _job_and_hook(local, fake, sample_dataset)
    before = local.state.store.get(job_id)
    forged_obj = {**obj, "status": "failed", "error": "forged"}
    body = json.dumps(forged_obj).encode()
    now = int(time.time())
    secret = fake.webhook_secret
    other = "whsec_" + base64.b64encode(b"x" * 24).decode()

    def post(headers, data=body, extra=None):
        return local.http.post(
            "/api/webhooks/replicate",
            content=data,
            headers={"content-type": "application/json", **headers, **(extra or {})},
        )

    cases = {
        "forged": (
            {
                "webhook-id": "msg_f1",
                "webhook-timestamp": str(now),
                "webhook-signature": sign(other, "msg_f1", now, body),
            },
            401,
        ),
        "tampered": (
            {
                "webhook-id": "msg_t1",
                "webhook-timestamp": str(now),
                "webhook-signature": sign(secret, "msg_t1", now, json.dumps(obj).encode()),
            },
            401,
        ),
        "expired": (
            {
                "webhook-id": "msg_e1",
                "webhook-timestamp": str(now - 3600),
                "webhook-signature": sign(secret, "msg_e1", now - 3600, body),
            },
            401,
        ),
        "unsigned": ({"webhook-id": "msg_u1", "webhook-timestamp": str(now)}, 400),
        "malformed": (
            {"webhook-id": "msg_m1", "webhook-timestamp": str(now), "webhook-signature": "v1,!!!notbase64"},
            401,
        ),
    }
    for name, (headers, status) in cases.items():
        r = post(headers)
        assert r.status_code == status, (name, r.status_code, r.text)
    # a replay of a genuine delivery: accepted once, then recognised and ignored
    sent = [w for w in fake.sent_webhooks if w.job_id == job_id and w.delivered][-1]
    replay_id = sent.webhook_id
    assert local.state.store.seen_webhook(replay_id)  # it was processed when first delivered
    good = {
        "webhook-id": replay_id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret, replay_id, now, body),
    }
    r = post(good)
    assert r.status_code == 200 and r.json().get("duplicate") is True
    # wrongly sourced: an address outside the allow-list, also when it claims another one in X-Forwarded-For
    from client.config import Settings  # settings are re-read per request

    s = Settings.load(local.state.root)
    s.webhook_allowed_ips = ["34.82.0.0/16", "35.185.0.0/16"]
    s.save(local.state.root)
    fresh = {
        "webhook-id": "msg_new",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret, "msg_new", now, body),
    }
    r = post(fresh, extra={"x-forwarded-for": "34.82.1.1"})
    assert r.status_code == 403, r.text
    after = local.state.store.get(job_id)
    assert after["status"] == before["status"] == "succeeded" and after.get("error") == before.get("error")


def test_oversized_webhook_bodies_are_refused(local, fake, sample_dataset):
    job_id, obj = _job_and_hook(local, fake, sample_dataset)
    from client.webhooks import MAX_WEBHOOK_BODY

    body = json.dumps({**obj, "logs": "x" * (MAX_WEBHOOK_BODY + 10)}).encode()
    now = int(time.time())
    r = local.http.post(
        "/api/webhooks/replicate",
        content=body,
        headers={
            "content-type": "application/json",
            "webhook-id": "msg_big",
            "webhook-timestamp": str(now),
            "webhook-signature": sign(fake.webhook_secret, "msg_big", now, body),
        },
    )
    assert r.status_code == 413


# -- end to end on the real Cog server --------------------------------------------------------------------


def test_end_to_end_training_on_the_real_cog_server(
    env, train_server, run_servers, sample_dataset, cog_weights, tmp_path
):
    """pack -> upload -> training with a destination (created) -> real Cog -> signed webhooks -> download;
    then "try it": the destination's new version renders through the API."""
    import numpy as np
    import torch
    from diffusers import FluxPipeline

    with FakeReplicate(
        cog_train_url=train_server.url, cog_run_for=run_servers.url_for, token=TOKEN, webhook_throttle_s=0.2
    ) as fake:
        server = LocalServer(env, fake)
        try:
            spec = {
                "base_weights": "tiny-flux-dev",
                "resolutions": "64",
                "steps": 8,
                "learning_rate": 0.01,
                "caption_dropout": 0,
                "validation": {"num_inference_steps": 2},
            }
            r = server.http.post(
                "/api/cloud/jobs/submit",
                json={"spec": spec, "dataset": str(sample_dataset), "destination": "acme/my-lora"},
            )
            assert r.status_code == 201, r.text
            job_id = r.json()["job"]["id"]
            rec = server.wait_job(job_id, delivered=True, timeout=240)
            assert rec["status"] == "succeeded", rec.get("error")
            assert rec["kind"] == "training" and rec["step"] == 8
            folder = env / "cloud_outputs" / job_id
            assert (folder / "pytorch_lora_weights.safetensors").is_file()
            assert any(w.job_id == job_id and w.delivered for w in fake.sent_webhooks)
            assert (
                fake.client().models.get("acme/my-lora").latest_version is not None
            )  # created, then versioned

            try_it = {
                "prompt": "a red circle",
                "num_outputs": 2,
                "seed": 1,
                "num_inference_steps": 2,
                "aspect_ratio": "custom",
                "width": 64,
                "height": 64,
                "output_format": "png",
            }
            r = server.http.post(f"/api/cloud/jobs/{job_id}/run", json=try_it)
            assert r.status_code == 200, r.text
            images = r.json()["images"]
            assert len(images) == 2 and all(i["path"].startswith("tries/") for i in images)
            first = server.http.get(images[0]["url"])
            assert first.status_code == 200 and first.content.startswith(b"\x89PNG")
            assert fake.count("POST", "/v1/predictions") == 1  # on the version the training made
            bad = server.http.post(f"/api/cloud/jobs/{job_id}/run", json={"prompt": "", "colour": "red"})
            assert bad.status_code == 422 and {p["field"] for p in bad.json()["detail"]["problems"]} == {
                "prompt",
                "colour",
            }
            wrong = server.http.post(f"/api/cloud/jobs/{job_id}/run", json={**try_it, "num_outputs": 7})
            assert wrong.status_code == 422 and "num_outputs" in wrong.text  # Replicate's own validation
        finally:
            server.close()

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return np.asarray(
            pipe(
                "a red circle",
                num_inference_steps=2,
                height=64,
                width=64,
                output_type="np",
                max_sequence_length=32,
                generator=torch.Generator().manual_seed(0),
            ).images[0]
        )

    base = render(FluxPipeline.from_pretrained(cog_weights / "tiny-flux-dev"))
    pipe = FluxPipeline.from_pretrained(cog_weights / "tiny-flux-dev")
    pipe.load_lora_weights(folder)
    assert np.abs(render(pipe) - base).max() > 0.01


@pytest.mark.parametrize("fault", ["upload-500", "account-slow", "create-503", "hardware-drop"])
def test_more_faults_give_clear_messages_and_lose_nothing(local, fake, sample_dataset, fault):
    if fault == "upload-500":
        fake.fail("/v1/files", 500, method="POST")
        r = _submit(local, sample_dataset)
        assert r.status_code == 502 and "upload" in r.json()["detail"] and "500" in r.json()["detail"]
    elif fault == "create-503":
        fake.fail(CREATE, 503, method="POST", retry_after="0")
        r = _submit(local, sample_dataset)
        assert r.status_code == 502 and "503" in r.json()["detail"]
    elif fault == "account-slow":
        fake.slow("/v1/account", 1.5)
        assert local.http.get("/api/cloud/providers/replicate/validate").json()["ok"] is True
        return
    else:
        fake.drop("/v1/hardware", method="GET", times=None)
        r = local.http.get("/api/cloud/providers/replicate/versions")
        assert r.status_code == 200  # other calls unaffected
        return
    assert not [j for j in local.state.store.list(limit=10) if j["status"] not in ("failed",)]
    assert local.state.store.spend_between() == 0
    fake.clear_faults()
    r = _submit(local, sample_dataset)  # the user simply tries again; one job results
    assert r.status_code == 201
    rec = local.wait_job(r.json()["job"]["id"])
    assert rec["status"] == "succeeded"
    assert (
        len(
            [
                q
                for q in fake.requests
                if q.method == "POST" and fnmatch.fnmatch(q.path, CREATE) and q.status == 201
            ]
        )
        == 1
    )


# -- request bodies, error shapes, webhooks that are not JSON ----------------------------------------------

BODYLESS = {("post", "/api/cloud/jobs/{job_id}/cancel")}


def test_openapi_documents_every_request_body(tmp_path):
    from client.server import State, create_app

    doc = create_app(State(root=tmp_path)).openapi()
    writes = [
        (m, path, op)
        for path, ops in doc["paths"].items()
        for m, op in ops.items()
        if m in ("post", "put", "patch")
    ]
    assert len(writes) >= 12
    for method, path, op in writes:
        if (method, path) in BODYLESS:
            assert "requestBody" not in op, path
            continue
        content = op.get("requestBody", {}).get("content", {})
        assert content and all("schema" in c for c in content.values()), (method, path)
    submit = doc["components"]["schemas"]["SubmitRequest"]
    assert "dataset" in submit["required"] and submit["additionalProperties"] is False
    assert "multipart/form-data" in doc["paths"]["/api/cloud/datasets"]["post"]["requestBody"]["content"]


def test_a_bad_request_body_names_each_field_and_echoes_no_value(local):
    r = local.http.post("/api/cloud/jobs/submit", json={"spec": {}, "dataset": 5, "colour": "red"})
    assert r.status_code == 422
    problems = {p["field"]: p["message"] for p in r.json()["detail"]["problems"]}
    assert set(problems) == {"dataset", "colour"} and problems["colour"] == "unknown field"
    r = local.http.put("/api/cloud/providers/replicate/token", json={"token": {"value": TOKEN}})
    assert r.status_code == 422 and TOKEN not in r.text
    assert r.json()["detail"]["problems"][0]["field"] == "token"


def test_billing_refused_upstream_is_a_402_here_too(local, fake, sample_dataset):
    fake.fail(CREATE, 402, method="POST")
    r = _submit(local, sample_dataset)
    assert r.status_code == 402 and "billing" in r.json()["detail"]
    assert local.state.store.spend_between() == 0  # the reservation was released


def test_a_signed_webhook_that_is_not_json_is_a_400_and_changes_nothing(local, fake, sample_dataset):
    job_id, obj = _job_and_hook(local, fake, sample_dataset)
    before = local.state.store.get(job_id)
    now = int(time.time())

    def post(webhook_id: str, body: bytes):
        return local.http.post(
            "/api/webhooks/replicate",
            content=body,
            headers={
                "content-type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": str(now),
                "webhook-signature": sign(fake.webhook_secret, webhook_id, now, body),
            },
        )

    for n, (body, reason) in enumerate(
        (
            (b"{not json", "not JSON"),
            (b"[1, 2]", "expected an object"),
            (b'"succeeded"', "expected an object"),
        )
    ):
        r = post(f"msg_bad{n}", body)
        assert r.status_code == 400 and reason in r.json()["detail"], r.text
    assert local.state.store.get(job_id) == before
    # the refused deliveries were not recorded: the same id with a proper body is processed, not a duplicate
    r = post("msg_bad0", json.dumps(obj).encode())
    assert r.status_code == 200 and "duplicate" not in r.json()
