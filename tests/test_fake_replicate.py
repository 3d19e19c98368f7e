"""The local Replicate fake (tests/fake_replicate.py), driven through the real replicate==1.0.7
client: every endpoint the submit client relies on, signed webhooks and their faults, API faults,
job forwarding to a Cog-like server (a stub that scrambles its webhooks), and end to end on the
real Cog servers: a training into a destination model, whose new version renders with the
trained weights (a run-mode server with COG_WEIGHTS = the training's weights), as on Replicate."""

# replicate exports Client through a lazy module pyright cannot see into
# pyright: reportPrivateImportUsage=false

from __future__ import annotations

import base64
import io
import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import replicate
from replicate.exceptions import ModelError, ReplicateError
from replicate.webhook import InvalidSignatureError, WebhookSigningSecret

from fake_replicate import TRAINER_MODEL, FakeReplicate, SyntheticRun

ROOT = Path(__file__).resolve().parent.parent
DATASET = "https://example.com/dataset.zip"  # synthetic jobs never download it
RUN = {"prompt": "a photo of sks"}  # a prediction's input: the run entry renders a prompt


# -- helpers ---------------------------------------------------------------------------------------


class Hooks:
    """A webhook receiver: keeps every attempt (headers, raw body, time); answers ``fail_status``
    to the first ``fail_first`` attempts."""

    def __init__(self, fail_first: int = 0, fail_status: int = 500):
        self.fail_first, self.fail_status = fail_first, fail_status
        self.attempts: list[dict] = []
        self.lock = threading.Condition()  # notified on every attempt: waits need no sleeps
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                with outer.lock:
                    n = len(outer.attempts)
                    code = outer.fail_status if n < outer.fail_first else 200
                    outer.attempts.append(
                        {
                            "headers": dict(self.headers),
                            "body": body,
                            "json": json.loads(body),
                            "code": code,
                            "at": time.monotonic(),
                            "path": self.path,
                        }
                    )
                    outer.lock.notify_all()
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?src=test"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @property
    def received(self) -> list[dict]:
        with self.lock:
            return [a for a in self.attempts if a["code"] == 200]

    def wait(self, pred, timeout: float = 10) -> list[dict]:
        with self.lock:
            if not self.lock.wait_for(lambda: pred(self.received), timeout):
                raise TimeoutError(f"webhooks received: {[a['json']['status'] for a in self.received]}")
            return self.received

    def wait_terminal(self, timeout: float = 10) -> list[dict]:
        return self.wait(
            lambda got: any(a["json"]["status"] in ("succeeded", "failed", "canceled") for a in got), timeout
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    with FakeReplicate(
        None,
        None,
        models=["acme/my-lora"],
        webhook_throttle_s=0.1,
        webhook_retry_delays=(0.05, 0.1, 0.2),
        synthetic=SyntheticRun(duration_s=0.2),
    ) as f:
        yield f


@pytest.fixture
def client(fake):
    return fake.client()


@pytest.fixture
def hooks():
    h = Hooks()
    yield h
    h.close()


def zip_names(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.namelist()


# -- account, auth, hardware -----------------------------------------------------------------------


def test_account_and_both_auth_schemes(fake, client):
    acct = client.accounts.current()
    assert (acct.type, acct.username, acct.name, acct.github_url) == (
        "organization",
        "acme",
        "Acme Corp, Inc.",
        "https://github.com/acme",
    )
    legacy = replicate.Client(base_url=fake.url, headers={"Authorization": f"Token {fake.token}"})
    assert legacy.accounts.current().username == "acme"

    with pytest.raises(ReplicateError) as e:
        replicate.Client(api_token="r8_wrong", base_url=fake.url).accounts.current()
    assert (e.value.status, e.value.title, e.value.detail) == (
        401,
        "Unauthenticated",
        "You did not pass a valid authentication token",
    )
    r = httpx.get(f"{fake.url}/v1/account")  # no header at all
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert r.json() == {
        "title": "Unauthenticated",
        "detail": "You did not pass a valid authentication token",
        "status": 401,
    }
    assert [(x.auth, x.status) for x in fake.requests if x.path == "/v1/account"] == [
        (True, 200),
        (True, 200),
        (True, 401),
        (False, 401),
    ]


def test_hardware_is_a_bare_array(fake, client):
    skus = {h.sku: h.name for h in client.hardware.list()}
    assert {"cpu", "gpu-t4", "gpu-l40s", "gpu-a100-large", "gpu-h100"} <= set(skus)
    assert all(skus.values())
    assert isinstance(
        httpx.get(f"{fake.url}/v1/hardware", headers={"Authorization": f"Bearer {fake.token}"}).json(), list
    )


# -- files -----------------------------------------------------------------------------------------


def test_files_create_and_get(fake, client, tmp_path):
    path = tmp_path / "data set.zip"
    path.write_bytes(b"PK-not-really-a-zip" * 10)
    f1 = client.files.create(path)  # name and type come from the multipart part
    assert (f1.name, f1.content_type, f1.size) == ("data set.zip", "application/zip", 190)
    assert f1.etag == f1.checksums["md5"] and len(f1.checksums["sha256"]) == 64
    assert f1.urls["get"] == f"{fake.url}/v1/files/{f1.id}" and f1.metadata == {}
    assert f1.expires_at > f1.created_at
    f2 = client.files.create(io.BytesIO(b"hello"), content_type="text/plain", metadata={"k": "v"})
    assert (f2.name, f2.content_type, f2.metadata) == ("file", "text/plain", {"k": "v"})

    assert client.files.get(f1.id).checksums == f1.checksums
    raw = httpx.get(fake.download_url(f1.id))  # unauthenticated loopback bytes (what Cog downloads)
    assert raw.content == path.read_bytes() and raw.url.raw_path.endswith(b"/data%20set.zip")
    with pytest.raises(ReplicateError) as e:
        client.files.get("bm90LWEtZmlsZQ")
    assert e.value.status == 404
    assert httpx.get(f"{fake.url}/_fake/files/bm90LWEtZmlsZQ/x").status_code == 404


def test_files_over_the_limit_get_413(fake, client):
    fake.max_file_size = 1024
    with pytest.raises(ReplicateError) as e:
        client.files.create(io.BytesIO(b"x" * 2048), filename="big.bin")
    assert (e.value.status, e.value.detail) == (413, "Files must be less than 100MB in size")
    client.files.create(io.BytesIO(b"x" * 1024), filename="ok.bin")


# -- models and versions ---------------------------------------------------------------------------


def test_models_and_versions(fake, client):
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    trainer = client.models.get(TRAINER_MODEL)
    assert (trainer.owner, trainer.name, trainer.visibility) == ("simpletuner", "advanced-trainer", "public")
    assert trainer.latest_version.id == fake.trainer_version and len(fake.trainer_version) == 64
    assert trainer.latest_version.openapi_schema == schema and trainer.latest_version.cog_version

    newer = fake.add_version(TRAINER_MODEL)
    versions = trainer.versions.list()
    assert [v.id for v in versions] == [newer, fake.trainer_version]  # newest first
    assert versions[1].openapi_schema == schema

    made = client.models.create("acme", "fresh", visibility="private", hardware="gpu-l40s", description="d")
    assert (made.owner, made.name, made.run_count, made.latest_version, made.description) == (
        "acme",
        "fresh",
        0,
        None,
        "d",
    )
    assert fake.requests[-1].status == 201
    with pytest.raises(ReplicateError) as e:  # duplicate name: 409 (the real answer is unconfirmed)
        client.models.create("acme", "fresh", visibility="private", hardware="cpu")
    assert e.value.status == 409
    with pytest.raises(ReplicateError) as e:
        client.models.create("someone-else", "x", visibility="private", hardware="cpu")
    assert e.value.status == 403
    with pytest.raises(ReplicateError) as e:
        client.models.create("acme", "bad-hw", visibility="private", hardware="gpu-tpu")
    assert e.value.status == 422
    with pytest.raises(ReplicateError) as e:
        client.models.get("acme/missing")
    assert e.value.status == 404


# -- predictions ---------------------------------------------------------------------------------------


def test_prediction_by_version_runs_and_serves_its_output(fake, client):
    from train.progress import parse_progress_line

    p = client.predictions.create(version=fake.trainer_version, input={**RUN, "num_outputs": 1})
    assert (p.status, p.model, p.version, p.logs, p.output) == (
        "starting",
        TRAINER_MODEL,
        fake.trainer_version,
        "",
        None,
    )
    assert len(p.id) == 26 and p.urls["get"] == f"{fake.url}/v1/predictions/{p.id}"
    assert fake.count("POST", "/v1/predictions") == 1 and fake.requests[-1].status == 201
    p.wait()
    assert p.status == "succeeded" and p.error is None
    assert p.started_at and p.completed_at and p.metrics["predict_time"] > 0
    steps = [rec for rec in map(parse_progress_line, p.logs.splitlines()) if rec and rec["phase"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] and {"loss", "lr", "s_per_step", "eta_s"} <= set(
        steps[0]
    )
    assert len(p.output) == 1 and p.output[0].startswith(f"{fake.url}/_fake/outputs/{p.id}/")
    r = httpx.get(p.output[0])
    assert r.headers["content-length"] == str(len(r.content)) and r.headers["etag"]
    assert r.content.startswith(b"\x89PNG") and r.headers["content-type"] == "image/png"
    assert client.models.get(TRAINER_MODEL).run_count == 1


def test_prediction_version_forms_and_errors(fake, client):
    for ref in (f"{TRAINER_MODEL}:{fake.trainer_version}", TRAINER_MODEL):
        assert client.predictions.create(version=ref, input=RUN).version == fake.trainer_version
    p = client.models.predictions.create(TRAINER_MODEL, input=RUN)
    assert p.version == fake.trainer_version
    with pytest.raises(ReplicateError) as e:
        client.predictions.create(version="f" * 64, input=RUN)
    assert (e.value.status, e.value.title) == (422, "Invalid version or not permitted")
    with pytest.raises(ReplicateError) as e:
        client.models.predictions.create("acme/nope", input={})
    assert e.value.status == 404
    r = httpx.post(
        f"{fake.url}/v1/predictions",
        headers={"Authorization": f"Bearer {fake.token}"},
        json={"version": fake.trainer_version, "input": {"num_outputs": 9}},
    )
    assert r.status_code == 422 and r.json()["title"] == "Input validation failed"
    fields = {f["field"]: f for f in r.json()["invalid_fields"]}
    assert fields["input"]["description"] == "prompt is required" and fields["input"]["type"] == "required"
    assert fields["input.num_outputs"]["type"] == "maximum"
    assert r.json()["detail"].startswith("- input: prompt is required\n")


def test_prefer_wait_and_run(fake, client):
    t = time.monotonic()
    p = client.models.predictions.create(TRAINER_MODEL, input=RUN, wait=5)
    assert p.status == "succeeded" and time.monotonic() - t < 3
    assert fake.count("GET", "/v1/predictions/*") == 0 and fake.requests[-1].status == 201
    out = client.run(TRAINER_MODEL, input=RUN)
    assert isinstance(out, list) and out[0].startswith(
        fake.url
    )  # http://127.0.0.1 outputs stay plain strings

    fake.synthetic = SyntheticRun(duration_s=5)
    r = httpx.post(
        f"{fake.url}/v1/models/{TRAINER_MODEL}/predictions",
        timeout=10,
        headers={"Authorization": f"Bearer {fake.token}", "Prefer": "wait=1"},
        json={"input": RUN},
    )
    assert (r.status_code, r.headers["preference-applied"], r.json()["status"]) == (202, "wait=1", "starting")
    assert r.headers["ratelimit-remaining"] == "599"
    client.predictions.cancel(r.json()["id"])


def test_cancel_a_prediction_and_it_stays_canceled(fake, client):
    fake.synthetic = SyntheticRun(duration_s=3)
    p = client.models.predictions.create(TRAINER_MODEL, input=RUN)
    fake.wait_for(p.id, ("processing",))
    c = client.predictions.cancel(p.id)
    assert c.status == "canceled" and c.completed_at and "predict_time" in c.metrics
    assert fake.requests[-1].status == 200
    fake.settled(p.id)  # the run has stopped: nothing can move it on
    assert client.predictions.get(p.id).status == "canceled"
    assert client.predictions.cancel(p.id).status == "canceled"  # canceling again is harmless


def test_a_failed_run(fake, client):
    fake.synthetic = SyntheticRun(duration_s=0.05, status="failed", error="boom: out of memory")
    p = client.models.predictions.create(TRAINER_MODEL, input=RUN)
    p.wait()
    assert (p.status, p.error, p.output) == ("failed", "boom: out of memory", None)
    with pytest.raises(ModelError):
        client.run(TRAINER_MODEL, input=RUN)


def test_lists_serve_the_newest_first_page(fake, client):
    fake.page_size = 2
    ids = [client.models.predictions.create(TRAINER_MODEL, input=RUN).id for _ in range(3)]
    page = client.predictions.list()
    assert [p.id for p in page.results] == ids[::-1][:2] and page.next is None
    assert client.trainings.list().results == []


# -- trainings ---------------------------------------------------------------------------------------


def test_training_into_a_destination(fake, client):
    t = client.trainings.create(
        model=TRAINER_MODEL,
        version=fake.trainer_version,
        input={"dataset": DATASET, "steps": 3},
        destination="acme/my-lora",
    )
    assert (t.status, t.model, t.version) == ("starting", TRAINER_MODEL, fake.trainer_version)
    assert t.urls["get"].endswith(f"/v1/predictions/{t.id}")  # the recorded create-response quirk
    assert fake.requests[-1].status == 201 and fake.requests[-1].path.endswith(
        f"/versions/{fake.trainer_version}/trainings"
    )
    fake.wait_for(t.id)
    done = client.trainings.get(t.id)
    assert done.status == "succeeded" and done.urls["get"].endswith(f"/v1/trainings/{t.id}")
    dest, _, vid = done.output["version"].partition(":")
    assert dest == "acme/my-lora" and len(vid) == 64 and done.destination == "acme/my-lora"
    assert "pytorch_lora_weights.safetensors" in zip_names(httpx.get(done.output["weights"]).content)
    lora = client.models.get("acme/my-lora")
    assert lora.latest_version.id == vid and [v.id for v in lora.versions.list()] == [vid]
    assert [x.id for x in client.trainings.list()] == [t.id]

    # the shorthand, and a prediction on the new version
    t2 = client.trainings.create(
        version=f"{TRAINER_MODEL}:{fake.trainer_version}",
        input={"dataset": DATASET},
        destination="acme/my-lora",
    )
    assert client.trainings.cancel(t2.id).status == "canceled"
    assert client.predictions.create(version=done.output["version"], input=RUN).version == vid


def test_training_destination_must_exist_and_be_ours(fake, client):
    fake.add_model("someone/theirs")
    for dest in ("acme/does-not-exist", "someone/theirs"):
        with pytest.raises(ReplicateError) as e:
            client.trainings.create(
                model=TRAINER_MODEL,
                version=fake.trainer_version,
                input={"dataset": DATASET},
                destination=dest,
            )
        assert (e.value.status, e.value.detail) == (404, "The specified training destination does not exist")
    assert client.trainings.list().results == []


# -- webhooks ------------------------------------------------------------------------------------------


def _secret(client) -> WebhookSigningSecret:
    secret = client.webhooks.default.secret()
    assert secret.key.startswith("whsec_") and base64.b64decode(secret.key[6:])
    return secret


def test_signed_webhooks_all_events_throttled(fake, client, hooks):
    secret = _secret(client)
    fake.synthetic = SyntheticRun(duration_s=1.0, steps=30)
    p = client.models.predictions.create(TRAINER_MODEL, input=RUN, webhook=hooks.url)
    got = hooks.wait_terminal()
    for a in got:
        assert (
            replicate.webhooks.validate(headers=a["headers"], body=a["body"], secret=secret, tolerance=300)
            is None
        )
        assert a["path"] == "/hook?src=test"  # query parameters are kept
    statuses = [a["json"]["status"] for a in got]
    assert statuses[0] == "starting" and statuses[-1] == "succeeded" and "processing" in statuses
    assert len({a["headers"]["webhook-id"] for a in got}) == len(got)
    assert (
        got[-1]["json"]
        == httpx.get(
            f"{fake.url}/v1/predictions/{p.id}", headers={"Authorization": f"Bearer {fake.token}"}
        ).json()
    )  # same as GET
    # logs are throttled: 33 log lines, but intermediate hooks at least 0.1 s apart
    sent = [w for w in fake.webhooks_for(p.id) if w.event == "logs"]
    assert 3 <= len(sent) < 20
    assert all(b.at - a.at >= 0.095 for a, b in zip(sent, sent[1:], strict=False))
    assert [w.event for w in fake.webhooks_for(p.id)][:: len(got) - 1] == ["start", "completed"]

    tampered = dict(got[-1]["headers"])
    with pytest.raises(InvalidSignatureError):
        replicate.webhooks.validate(
            headers=tampered, body=got[-1]["body"].replace("succeeded", "failed"), secret=secret
        )


def test_webhook_events_filter(fake, client, hooks):
    p = client.models.predictions.create(
        TRAINER_MODEL, input=RUN, webhook=hooks.url, webhook_events_filter=["completed"]
    )
    fake.settled(p.id)  # every webhook it will send has been sent
    assert [a["json"]["status"] for a in hooks.wait_terminal()] == ["succeeded"]
    with pytest.raises(ReplicateError) as e:
        client.models.predictions.create(
            TRAINER_MODEL, input=RUN, webhook=hooks.url, webhook_events_filter=["bogus"]
        )
    assert e.value.status == 422


def test_completed_webhook_is_retried_with_the_same_id(fake, client):
    hooks = Hooks(fail_first=3, fail_status=503)  # start fails once (never retried), completed twice
    try:
        p = client.models.predictions.create(
            TRAINER_MODEL, input=RUN, webhook=hooks.url, webhook_events_filter=["start", "completed"]
        )
        got = hooks.wait_terminal()
    finally:
        hooks.close()
    assert [a["json"]["status"] for a in got] == ["succeeded"]  # the failed start is never retried
    fake.settled(p.id)  # the receiver may have the last attempt before the fake has recorded it
    sent = fake.webhooks_for(p.id)
    assert [(w.event, w.attempt, w.delivered) for w in sent] == [
        ("start", 1, False),
        ("completed", 1, False),
        ("completed", 2, False),
        ("completed", 3, True),
    ]
    assert len({w.webhook_id for w in sent if w.event == "completed"}) == 1
    assert [a["headers"]["webhook-id"] for a in hooks.attempts[1:]] == [sent[1].webhook_id] * 3

    # an unreachable receiver: every attempt fails, then the fake gives up
    dead = Hooks()
    dead.close()
    p = client.models.predictions.create(
        TRAINER_MODEL, input=RUN, webhook=dead.url, webhook_events_filter=["completed"]
    )
    fake.settled(p.id)  # the fake has given up retrying
    attempts = fake.webhooks_for(p.id)
    assert [w.attempt for w in attempts] == [1, 2, 3, 4] and not any(w.delivered for w in attempts)
    assert all(w.error for w in attempts)


def test_webhook_faults(fake, client, hooks):
    secret = _secret(client)
    events = ["start", "completed"]

    def run() -> tuple[str, int]:
        n = len(hooks.received)
        p = client.models.predictions.create(
            TRAINER_MODEL, input=RUN, webhook=hooks.url, webhook_events_filter=events
        )
        fake.wait_for(p.id)
        return p.id, n

    # duplicated: the completed event twice with one webhook-id
    fake.webhook_fault("duplicate", event="completed")
    pid, n = run()
    got = hooks.wait(lambda g: len(g) >= n + 3)[n:]
    assert [a["json"]["status"] for a in got] == ["starting", "succeeded", "succeeded"]
    assert got[1]["headers"]["webhook-id"] == got[2]["headers"]["webhook-id"]
    for a in got:
        replicate.webhooks.validate(headers=a["headers"], body=a["body"], secret=secret)

    # reordered: start is held back and sent after completed
    fake.webhook_fault("reorder", event="start")
    pid, n = run()
    got = hooks.wait(lambda g: len(g) >= n + 2)[n:]
    assert [a["json"]["status"] for a in got] == ["succeeded", "starting"]

    # late: start arrives 1 s later, after completed
    fake.webhook_fault("late", event="start", delay_s=1.0)
    pid, n = run()
    got = hooks.wait(lambda g: len(g) >= n + 2)[n:]
    assert [a["json"]["status"] for a in got] == ["succeeded", "starting"]
    # the fake records an attempt once its answer is back: after the receiver saw it
    fake.wait_until(lambda: len(fake.webhooks_for(pid)) >= 2, what="the late webhook's record")
    assert [w.fault for w in fake.webhooks_for(pid)] == [None, "late"]

    # dropped: the completed event never arrives
    fake.webhook_fault("drop", event="completed")
    pid, n = run()
    fake.settled(pid)
    assert [a["json"]["status"] for a in hooks.received[n:]] == ["starting"]
    dropped = fake.webhooks_for(pid)[-1]
    assert (dropped.event, dropped.fault, dropped.delivered) == ("completed", "drop", False)


# -- API faults ----------------------------------------------------------------------------------------


def test_429_then_success_on_a_get_is_retried_by_the_client(fake, client):
    p = client.models.predictions.create(TRAINER_MODEL, input=RUN)
    fake.fail("/v1/predictions/*", 429, times=2, retry_after="0", method="GET")
    assert client.predictions.get(p.id).id == p.id
    assert [r.status for r in fake.requests if r.path == f"/v1/predictions/{p.id}"] == [429, 429, 200]

    fake.fail("/v1/predictions/*", 503, times=1, retry_after="0")
    assert client.predictions.get(p.id).id == p.id

    fake.fail("/v1/predictions/*", 500, times=1)  # 500 is not retried
    with pytest.raises(ReplicateError) as e:
        client.predictions.get(p.id)
    assert e.value.status == 500
    assert client.predictions.get(p.id).id == p.id


def test_429_and_503_on_a_post_raise_at_once(fake, client):
    fake.fail("/v1/models/*/predictions", 429, retry_after="0")
    with pytest.raises(ReplicateError) as e:
        client.models.predictions.create(TRAINER_MODEL, input=RUN)
    assert (e.value.status, e.value.detail) == (429, "Request was throttled. Your rate limit resets in ~30s.")
    assert fake.count("POST", "/v1/models/*/predictions") == 1 and client.predictions.list().results == []
    fake.fail("/v1/predictions", 503)
    with pytest.raises(ReplicateError) as e:
        client.predictions.create(version=fake.trainer_version, input=RUN)
    assert e.value.status == 503
    fake.fail("/v1/predictions", 402)
    with pytest.raises(ReplicateError) as e:
        client.predictions.create(version=fake.trainer_version, input=RUN)
    assert (e.value.status, e.value.title) == (402, "Billing required")
    r = [x for x in fake.requests if x.status == 503][0]
    assert (r.method, r.fault) == ("POST", "status")


def test_dropped_and_slow_responses(fake, client):
    fake.drop("/v1/account")
    with pytest.raises(httpx.TransportError):
        client.accounts.current()
    assert fake.requests[-1].status is None and fake.requests[-1].fault == "drop"
    assert client.accounts.current().username == "acme"  # only the next one was dropped

    fake.slow("/v1/hardware", 0.5)
    t = time.monotonic()
    client.hardware.list()
    assert time.monotonic() - t >= 0.5


def test_output_downloads_resume_with_range(fake, client):
    """How the client's delivery resumes an interrupted download: ``Range: bytes=N-``."""
    t = client.trainings.create(
        model=TRAINER_MODEL,
        version=fake.trainer_version,
        input={"dataset": DATASET},
        destination="acme/my-lora",
    )
    weights = fake.wait_for(t.id)["output"]["weights"]
    full = httpx.get(weights)
    size = len(full.content)
    assert full.headers["accept-ranges"] == "bytes" and int(full.headers["content-length"]) == size > 100

    fake.truncate("/_fake/outputs/*", after_bytes=100)
    got = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("GET", weights) as r:
            assert r.headers["content-length"] == str(size)
            for chunk in r.iter_bytes():
                got += chunk
    assert len(got) == 100
    rest = httpx.get(weights, headers={"Range": f"bytes={len(got)}-"})
    assert rest.status_code == 206 and rest.headers["content-range"] == f"bytes {len(got)}-{size - 1}/{size}"
    assert got + rest.content == full.content

    assert httpx.get(weights, headers={"Range": "bytes=0-9"}).content == full.content[:10]
    assert httpx.get(weights, headers={"Range": "bytes=-5"}).status_code == 200  # a form it ignores: all
    bad = httpx.get(weights, headers={"Range": f"bytes={size}-"})  # the client's "already complete"
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{size}"
    assert httpx.head(weights).headers["content-length"] == str(size)


# -- forwarding to a Cog-like server (a stub that behaves like coglet, scrambled) ----------------------


class StubCog:
    """Answers like coglet with ``Prefer: respond-async`` (409 once: slot busy), downloads the
    dataset URL it is given, then sends its webhooks out of order: completed first, then a stale
    ``processing`` hook with fewer logs and an intermediate output."""

    def __init__(self, output: dict | str, status: str = "succeeded", hold: bool = False):
        self.jobs: list[dict] = []
        self.cancels: list[str] = []
        self.downloads: dict[str, bytes] = {}
        self.output, self.status, self.hold = output, status, hold
        self.busy_once = True
        self.hooks_sent = threading.Event()  # the run's last (stale) webhook, or the cancel's, is out
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if self.path.endswith("/cancel"):
                    jid = self.path.split("/")[2]
                    outer.cancels.append(jid)
                    job = next(j for j in outer.jobs if j["id"] == jid)
                    threading.Thread(target=outer._cancel_hook, args=(job,)).start()
                    return self._reply(200, {})
                if outer.busy_once:
                    outer.busy_once = False
                    return self._reply(
                        409, {"error": "At capacity - all prediction slots busy", "status": "failed"}
                    )
                assert self.headers.get("prefer") == "respond-async"
                body["path"] = self.path
                outer.jobs.append(body)
                threading.Thread(target=outer._run, args=(body,)).start()
                self._reply(202, {"id": body["id"], "status": "starting"})

            def _reply(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def _hook(self, job: dict, payload: dict) -> None:
        httpx.post(job["webhook"], json={"id": job["id"], **payload})

    def _cancel_hook(self, job: dict) -> None:
        self._hook(job, {"status": "canceled", "logs": "line 1\n", "metrics": {"predict_time": 0.5}})
        self.hooks_sent.set()

    def _run(self, job: dict) -> None:
        url = job["input"]["dataset"]
        if url.startswith("http://127.0.0.1"):
            self.downloads[url] = httpx.get(url).content  # no auth: the fake's loopback file URL
        self._hook(job, {"status": "processing", "logs": "", "metrics": {}})
        self._hook(job, {"status": "processing", "logs": "line 1\nline 2\n", "metrics": {}})
        if self.hold:
            return
        final = {
            "status": self.status,
            "logs": "line 1\nline 2\nline 3\n",
            "metrics": {"predict_time": 1.25},
            "output": self.output if self.status == "succeeded" else None,
            "error": "Prediction failed: ValueError: bad" if self.status == "failed" else None,
        }
        self._hook(job, final)
        self._hook(
            job, {"status": "processing", "logs": "line 1\n", "output": ["data:,stale"], "metrics": {}}
        )
        self.hooks_sent.set()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_forwarding_to_cog_survives_scrambled_webhooks(tmp_path):
    out_zip = b"PK\x03\x04" + b"fake zip bytes" * 10
    cog = StubCog(_data_uri(out_zip, "application/zip"))  # coglet inlines a Path without --upload-url
    hooks = Hooks()
    try:
        with FakeReplicate(None, cog.url, models=["acme/my-lora"]) as fake:
            client = fake.client()
            ds = tmp_path / "ds.zip"
            ds.write_bytes(b"dataset bytes")
            p = client.trainings.create(
                model=TRAINER_MODEL,
                version=fake.trainer_version,
                destination="acme/my-lora",
                input={"dataset": ds, "steps": 3},
                webhook=hooks.url,
            )
            assert p.input["dataset"].startswith(f"{fake.url}/v1/files/")  # the client uploaded the Path
            fake.wait_for(p.id)
            assert cog.hooks_sent.wait(10)  # the stale hook has landed, after completion
            done = client.trainings.get(p.id)
            sent = cog.jobs[0]
            assert sent["id"] == p.id and sent["path"] == "/trainings"
            assert sent["webhook"] == f"{fake.url}/_fake/cog-webhook/{p.id}"
            assert sent["webhook_events_filter"] == ["start", "output", "logs", "completed"]
            file_id = p.input["dataset"].rsplit("/", 1)[1]
            assert sent["input"] == {"dataset": fake.download_url(file_id), "steps": 3}
            assert cog.downloads[sent["input"]["dataset"]] == b"dataset bytes"
            assert (done.status, done.logs, fake.job(p.id)["metrics"]["predict_time"]) == (
                "succeeded",
                "line 1\nline 2\nline 3\n",
                1.25,
            )  # 1.0.7's Training drops metrics
            assert done.output["weights"] == f"{fake.url}/_fake/outputs/{p.id}/output.zip"
            assert httpx.get(done.output["weights"]).content == out_zip
            assert [c["status"] for c in fake.cog_requests] == [409, 202]  # queued while the slot was busy
            assert fake.count("POST", "/v1/models/*/versions/*/trainings") == 1
            assert hooks.wait_terminal()[-1]["json"]["status"] == "succeeded"
    finally:
        cog.close()
        hooks.close()


def test_trainings_and_cancel_are_forwarded_to_cog():
    weights = b"PK\x03\x04weights"
    cog = StubCog(_data_uri(weights, "application/zip"))
    cog.busy_once = False
    try:
        with FakeReplicate(None, cog.url, models=["acme/my-lora"]) as fake:
            client = fake.client()
            t = client.trainings.create(
                model=TRAINER_MODEL,
                version=fake.trainer_version,
                input={"dataset": "https://example.com/x.zip"},
                destination="acme/my-lora",
            )
            fake.wait_for(t.id)
            done = client.trainings.get(t.id)
            assert cog.jobs[0]["path"] == "/trainings" and done.status == "succeeded"
            assert (
                done.output["version"]
                == f"acme/my-lora:{client.models.get('acme/my-lora').latest_version.id}"
            )
            assert httpx.get(done.output["weights"]).content == weights
            assert done.output["weights"].endswith("/output.zip")
            assert cog.hooks_sent.wait(10)
            cog.hooks_sent.clear()

            cog.hold = True  # the next job keeps running until canceled
            t2 = client.trainings.create(
                model=TRAINER_MODEL,
                version=fake.trainer_version,
                input={"dataset": "https://example.com/x.zip"},
                destination="acme/my-lora",
            )
            fake.wait_for(t2.id, ("processing",))
            assert client.trainings.cancel(t2.id).status == "canceled"
            assert cog.cancels == [t2.id]  # forwarded before the cancel was answered
            assert any(c["url"].endswith(f"/trainings/{t2.id}/cancel") for c in fake.cog_requests)
            assert cog.hooks_sent.wait(10)  # Cog's own "canceled" webhook has reached the fake
            assert client.trainings.get(t2.id).status == "canceled"
    finally:
        cog.close()


# -- end to end: the real Cog servers with the tiny Flux model --------------------------------------


def test_a_training_makes_a_version_that_renders_with_its_weights(
    train_server, run_servers, upload_sink, sample_zip
):
    """The dataset Path is uploaded by the client, rewritten to the fake's loopback URL and downloaded
    by Cog; the weights are uploaded by Cog to the file store (--upload-url); the destination's new
    version runs on a run-mode server whose COG_WEIGHTS is those weights."""
    from conftest import tiny_spec

    hooks = Hooks()
    try:
        with FakeReplicate(
            None, train_server.url, cog_run_for=run_servers.url_for, models=["acme/my-lora"]
        ) as fake:
            client = fake.client()
            secret = client.webhooks.default.secret()
            t = client.trainings.create(
                model=TRAINER_MODEL,
                version=fake.trainer_version,
                destination="acme/my-lora",
                webhook=hooks.url,
                webhook_events_filter=["completed"],
                input={"dataset": sample_zip, "spec": tiny_spec(), "steps": 4, "trigger_word": "sks"},
            )
            fake.wait_for(t.id, timeout=300)
            done = client.trainings.get(t.id)
            assert done.status == "succeeded", (done.error, done.logs[-2000:])
            assert 'PROGRESS {"phase": "train", "step": 4, "total": 4' in done.logs
            assert done.started_at and done.completed_at
            weights = done.output["weights"]
            assert weights.startswith(upload_sink.url) and "pytorch_lora_weights.safetensors" in zip_names(
                httpx.get(weights, timeout=60).content
            )
            # submitted once, the dataset went up once and Cog fetched it from the loopback URL
            assert fake.count("POST", "/v1/models/*/versions/*/trainings") == 1
            assert fake.count("POST", "/v1/files") == 1 and fake.count("GET", "/_fake/files/*") >= 1
            final = hooks.wait_terminal(timeout=30)[-1]
            replicate.webhooks.validate(headers=final["headers"], body=final["body"], secret=secret)
            assert final["json"]["output"] == done.output

            version = client.models.get("acme/my-lora").latest_version
            assert f"acme/my-lora:{version.id}" == done.output["version"]
            assert version.openapi_schema["components"]["schemas"]["Input"]["required"] == ["prompt"]
            inputs = {
                "prompt": "sks, a red circle",
                "aspect_ratio": "custom",
                "width": 64,
                "height": 64,
                "num_inference_steps": 2,
                "seed": 5,
                "output_format": "png",
            }
            trained = client.run("acme/my-lora", input=inputs)
            plain = client.run(TRAINER_MODEL, input=inputs)  # the trainer's own version: the base model
            assert len(trained) == 1 and len(plain) == 1
            a, b = httpx.get(trained[0]).content, httpx.get(plain[0]).content
            assert a.startswith(b"\x89PNG") and b.startswith(b"\x89PNG") and a != b
            assert weights in run_servers.servers  # the version ran with COG_WEIGHTS = the training's weights
    finally:
        hooks.close()
