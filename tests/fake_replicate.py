"""A local fake of the Replicate HTTP API (v1), for tests only.

It follows Replicate's HTTP API reference (replicate.com/docs/reference/http) and what the
``replicate==1.0.7`` client sends and accepts, and runs jobs for real on the Cog HTTP server
(coglet) when given its URLs, or synthetically when not.  Point the real client at it::

    with FakeReplicate(cog_predict_url=None, cog_train_url=None) as fake:
        client = replicate.Client(api_token=fake.token, base_url=fake.url)
        prediction = client.models.predictions.create("simpletuner/advanced-trainer", input={...})

Served (``Authorization: Bearer <token>`` or ``Token <token>``; 401 problem+json otherwise): what
the submit client (``client/providers.py``, ``client/jobs.py``) calls through the 1.0.7 client --
account, files (multipart upload, 413 over ``max_file_size``; GET), hardware, models (get, create)
and their versions (list), predictions (by version or by model, ``Prefer: wait``; get, cancel,
list), trainings (destination must exist and belong to the account; get, cancel, list), the
default webhook secret.  Lists serve their first page only (all the client and 1.0.7's
``versions.list()`` read).  Unauthenticated loopback helpers under ``/_fake/``: raw file bytes
(``/_fake/files/{id}/{name}``, what Cog downloads), outputs (``/_fake/outputs/{job}/{name}``,
resumable with ``Range``), and the Cog webhook sink.

Jobs: a training goes to ``cog_train_url`` (``POST /trainings``), a prediction to a run-mode
server: ``cog_run_for(weights)`` gives its URL for the version's COG_WEIGHTS (None for the
trainer's own version), or ``cog_predict_url`` for every version.  Each is sent with
``Prefer: respond-async``, the fake's job id and a webhook back to the fake;
``{fake}/v1/files/{id}`` strings in the input become the unauthenticated download URLs.  Cog's
webhooks (unordered) update the job; a terminal status is never regressed.  As on Replicate, a
succeeded training's output file becomes ``{"version", "weights"}`` and a new version of the
destination, whose predictions run with COG_WEIGHTS = those weights.  Without a Cog URL the
job runs synthetically (``fake.synthetic``: trainings return a LoRA-shaped zip, predictions a PNG).

Outgoing webhooks are signed per Standard Webhooks with the account's ``whsec_`` secret; logs and
output events are throttled; the completed event is retried (same ``webhook-id``).  Faults for
both the API and the webhooks can be injected at runtime (see ``fail``, ``slow``, ``drop``,
``truncate`` and ``webhook_fault``); ``wait_for``, ``wait_until`` and ``settled`` wait on the fake's
own state changes, so tests never sleep for a fixed time.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import io
import json
import mimetypes
import os
import re
import secrets
import socket
import threading
import time
import traceback
import urllib.parse
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jsonschema

ROOT = Path(__file__).resolve().parent.parent
TRAINER_MODEL = "simpletuner/advanced-trainer"
TERMINAL = ("succeeded", "failed", "canceled")
EVENTS = ("start", "output", "logs", "completed")
MiB = 1024 * 1024

# Replicate's SKUs as its pricing page names them: the L40S multiples put the count first, the
# A100 / H100 / A40 multiples put it last.
HARDWARE = [
    {"sku": "cpu", "name": "CPU"},
    {"sku": "gpu-t4", "name": "Nvidia T4 GPU"},
    {"sku": "gpu-a40-small", "name": "Nvidia A40 GPU"},
    {"sku": "gpu-a40-large", "name": "Nvidia A40 (Large) GPU"},
    {"sku": "gpu-a40-large-2x", "name": "2x Nvidia A40 (Large) GPU"},
    {"sku": "gpu-a40-large-4x", "name": "4x Nvidia A40 (Large) GPU"},
    {"sku": "gpu-a40-large-8x", "name": "8x Nvidia A40 (Large) GPU"},
    {"sku": "gpu-l40s", "name": "Nvidia L40S GPU"},
    {"sku": "gpu-2x-l40s", "name": "2x Nvidia L40S GPU"},
    {"sku": "gpu-4x-l40s", "name": "4x Nvidia L40S GPU"},
    {"sku": "gpu-8x-l40s", "name": "8x Nvidia L40S GPU"},
    {"sku": "gpu-a100-large", "name": "Nvidia A100 (80GB) GPU"},
    {"sku": "gpu-a100-large-2x", "name": "2x Nvidia A100 (80GB) GPU"},
    {"sku": "gpu-a100-large-4x", "name": "4x Nvidia A100 (80GB) GPU"},
    {"sku": "gpu-a100-large-8x", "name": "8x Nvidia A100 (80GB) GPU"},
    {"sku": "gpu-h100", "name": "Nvidia H100 GPU"},
    {"sku": "gpu-h100-2x", "name": "2x Nvidia H100 GPU"},
    {"sku": "gpu-h100-4x", "name": "4x Nvidia H100 GPU"},
    {"sku": "gpu-h100-8x", "name": "8x Nvidia H100 GPU"},
]

_PREFER_WAIT = re.compile(r"^wait(=([1-9]|[1-9][0-9]|60))?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# -- small helpers -------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _job_id() -> str:
    """26 lowercase base32 characters, like ``wj4is6lbdqqkdepnwpr6v2kuva``."""
    return base64.b32encode(os.urandom(16)).decode().lower().rstrip("=")


def _file_id() -> str:
    """Base64 of a UUID string, like the real ``NGZiNmY2YzQtMThh...``."""
    return base64.b64encode(str(uuid.uuid4()).encode()).decode().rstrip("=")


def _problem(status: int, detail: str, title: str | None = None, **extra) -> _Resp:
    body: dict[str, Any] = {}
    if title:
        body["title"] = title
    body["detail"] = detail
    body["status"] = status
    body.update(extra)
    return _Resp(status, body, content_type="application/problem+json")


def _not_found(detail: str = "Not found.") -> _Resp:
    return _problem(404, detail)


def _invalid_version() -> _Resp:
    return _problem(
        422,
        "The specified version does not exist (or perhaps you don't have permission to use it?)",
        "Invalid version or not permitted",
    )


def _invalid_fields(fields: list[dict]) -> _Resp:
    detail = "".join(f"- {f['field']}: {f['description']}\n" for f in fields)
    return _problem(422, detail, "Input validation failed", invalid_fields=fields)


def tiny_zip(files: dict[str, bytes] | None = None) -> bytes:
    """A small zip; by default a LoRA-shaped archive (an empty but valid safetensors file)."""
    files = (
        files
        if files is not None
        else {
            "pytorch_lora_weights.safetensors": (2).to_bytes(8, "little") + b"{}",
            "config.json": b'{"synthetic": true}',
            "README.md": b"# synthetic LoRA\n",
        }
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tiny_png(color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """An 8x8 PNG (what a synthetic prediction renders)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def progress_line(step: int, total: int, loss: float, lr: float = 1e-4, s_per_step: float = 0.2) -> str:
    """A line in the trainer's progress format (``train/progress.py``)."""
    rec = {
        "phase": "train",
        "step": step,
        "total": total,
        "loss": round(loss, 6),
        "lr": lr,
        "s_per_step": round(s_per_step, 4),
        "eta_s": round(max(total - step, 0) * s_per_step, 1),
    }
    return "PROGRESS " + json.dumps(rec)


# -- configuration records -----------------------------------------------------------------------


@dataclass
class SyntheticRun:
    """How a job runs when no Cog URL is configured (snapshotted when the job is created).

    ``duration_s`` is the time in ``processing``, spread evenly over a few plain log lines and
    ``steps`` progress lines in the trainer's format.  ``status`` is the final status
    (``succeeded`` or ``failed``; ``canceled`` also works).
    """

    duration_s: float = 0.3
    steps: int = 5
    status: str = "succeeded"
    error: str = "synthetic failure: CUDA out of memory"
    predict_time: float | None = None  # metrics.predict_time; default: the measured time
    extra_lines: tuple[str, ...] = ()  # logged after the steps (e.g. the train entry's "publish failed: ...")

    def lines(self) -> list[str]:
        sps = self.duration_s / max(self.steps, 1)
        out = ["synthetic run: loading base weights", "dataset: 8 images used"]
        out += [progress_line(i, self.steps, 0.5 / i, s_per_step=sps) for i in range(1, self.steps + 1)]
        out += self.extra_lines
        out.append("PROGRESS " + json.dumps({"phase": "done", "step": self.steps, "total": self.steps}))
        return out


@dataclass
class HttpFault:
    """A fault on API responses.  ``pattern`` is an fnmatch glob on the request path (no query),
    e.g. ``/v1/predictions*``; a glob matches ``/_fake/...`` paths only if it starts with
    ``/_fake/``.  ``times=None`` means every matching request."""

    pattern: str
    kind: str = "status"  # status | delay | drop | truncate
    status: int = 429
    times: int | None = 1
    method: str | None = None
    retry_after: str | None = None
    delay_s: float = 0.0
    after_bytes: int | None = None  # truncate: bytes of the body sent before closing
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method and self.method.upper() != method:
            return False
        if path.startswith("/_fake/") and not self.pattern.startswith("/_fake/"):
            return False
        return fnmatch.fnmatchcase(path, self.pattern)


@dataclass
class WebhookFault:
    """A fault on outgoing webhooks: ``drop`` (never sent), ``duplicate`` (sent twice, same
    ``webhook-id``), ``reorder`` (held back and sent after the job's next message), ``late``
    (sent ``delay_s`` later, on the side, so later messages overtake it)."""

    kind: str
    event: str | None = None  # start | output | logs | completed | None (any)
    times: int | None = 1
    delay_s: float = 1.0
    job_id: str | None = None
    hits: int = 0

    def matches(self, event: str, job_id: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (self.event in (None, event)) and (self.job_id in (None, job_id))


@dataclass
class RequestRecord:
    method: str
    path: str
    query: str
    auth: bool  # an Authorization header was present
    body_size: int
    status: int | None  # None: the connection was dropped
    fault: str | None
    at: float


@dataclass
class SentWebhook:
    job_id: str
    event: str
    webhook_id: str
    status: str  # the job status in the payload
    url: str
    attempt: int
    delivered: bool  # got a 2xx
    http_status: int | None
    error: str | None
    fault: str | None
    at: float  # when the attempt was sent (time.time())
    body: str = field(repr=False, default="")


# -- server internals ----------------------------------------------------------------------------


@dataclass
class _Resp:
    status: int
    body: Any = None  # dict/list → JSON; bytes → raw
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass
class _Req:
    method: str
    path: str
    query: dict[str, list[str]]
    raw_query: str
    headers: Any
    body: bytes

    def json(self) -> Any:
        if not self.body:
            return {}
        return json.loads(self.body)


@dataclass
class _Blob:
    data: bytes
    content_type: str
    etag: str


@dataclass
class _File:
    id: str
    name: str
    content_type: str
    data: bytes
    metadata: dict
    created_at: datetime
    seq: int


@dataclass
class _Version:
    id: str
    created_at: datetime
    cog_version: str
    openapi_schema: dict
    weights: str | None = None  # a training's weights: the COG_WEIGHTS its predictions run with


@dataclass
class _Model:
    owner: str
    name: str
    visibility: str
    hardware: str
    description: str | None = None
    run_count: int = 0
    versions: list[_Version] = field(default_factory=list)  # newest first
    seq: int = 0


@dataclass
class _Job:
    kind: str  # prediction | training
    id: str
    model: str
    version: str
    input: dict
    created_at: datetime
    seq: int
    webhook: str | None = None
    events: tuple[str, ...] = EVENTS
    destination: str | None = None
    status: str = "starting"
    logs: str = ""
    output: Any = None
    error: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    metrics: dict = field(default_factory=dict)
    cog_url: str | None = None
    cog_weights: str | None = None  # predictions: the version's trained weights (COG_WEIGHTS)
    cog_resolve: bool = False  # predictions: ask ``cog_run_for`` for the Cog URL when the job starts
    cog_accepted: bool = False
    synthetic: SyntheticRun | None = None
    canceled: threading.Event = field(default_factory=threading.Event)
    channel: _WebhookChannel | None = None
    runner: threading.Thread | None = None  # runs the job (synthetic) or hands it to Cog

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, fake: FakeReplicate):
        self.fake = fake
        self.open_sockets: set[socket.socket] = set()
        self.sock_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self):
        sock, addr = super().get_request()
        with self.sock_lock:
            self.open_sockets.add(sock)
        return sock, addr

    def shutdown_request(self, request):
        with self.sock_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):  # quiet: clients hang up on purpose in tests
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):
        pass

    def _any(self):
        self.server.fake._serve(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _any


class _WebhookChannel:
    """One job's outgoing webhooks, sent in order from one thread: ``start`` and ``completed``
    immediately, ``logs``/``output`` coalesced and at least ``throttle_s`` apart."""

    def __init__(self, fake: FakeReplicate, job: _Job):
        self.fake = fake
        self.job_id = job.id
        self.url = job.webhook or ""  # a channel exists only for a job with a webhook
        self.events = job.events
        self.cv = threading.Condition()
        self.start_body: str | None = None
        self.completed_body: str | None = None
        self.completed_status = ""
        self.start_status = ""
        self.pending: set[str] = set()
        self.last_intermediate = 0.0
        self.held: tuple | None = None  # (event, body, status, fault-kind)
        self.thread = threading.Thread(target=self._loop, name=f"webhooks-{job.id}", daemon=True)
        self.thread.start()

    def notify(self, event: str, body: str | None = None, status: str = "") -> None:
        with self.cv:
            if event == "start":
                self.start_body, self.start_status = body, status
            elif event == "completed":
                self.completed_body, self.completed_status = body, status
            else:
                self.pending.add(event)
            self.cv.notify_all()

    def wake(self) -> None:
        with self.cv:
            self.cv.notify_all()

    def _next(self):
        fake = self.fake
        with self.cv:
            while True:
                if fake._stopping.is_set():
                    return None
                if self.start_body is not None:
                    body, status, self.start_body = self.start_body, self.start_status, None
                    return "start", body, status
                if self.completed_body is not None:
                    self.pending.clear()
                    body, status, self.completed_body = self.completed_body, self.completed_status, None
                    return "completed", body, status
                if self.pending:
                    wait = self.last_intermediate + fake.webhook_throttle_s - time.monotonic()
                    if wait <= 0:
                        event = "output" if "output" in self.pending else "logs"
                        self.pending.clear()
                        self.last_intermediate = time.monotonic()
                        return event, None, ""
                    self.cv.wait(wait)
                else:
                    self.cv.wait()  # notify() or wake() (on stop) ends the wait

    def _loop(self) -> None:
        fake = self.fake
        while True:
            item = self._next()
            if item is None:
                return
            event, body, status = item
            if body is None:  # throttled events carry the state at send time
                with fake._lock:
                    job = fake._jobs[self.job_id]
                    if job.terminal:
                        continue  # the completed event carries everything
                    body, status = fake._dump(job), job.status
            if self.url and event in self.events:
                self._send(event, body, status)
            if event == "completed":
                if self.held is not None:  # nothing came after it: release it a little later
                    fake._stopping.wait(fake.webhook_reorder_max_hold_s)
                    self._release_held()
                return

    def _release_held(self) -> None:
        if self.held is not None:
            event, body, status, msg_id = self.held
            self.held = None
            self.fake._deliver(
                self.job_id,
                self.url,
                event,
                body,
                status,
                "reorder",
                retry=event == "completed",
                msg_id=msg_id,
            )

    def _send(self, event: str, body: str, status: str) -> None:
        fake = self.fake
        fault = fake._take_webhook_fault(event, self.job_id)
        retry = event == "completed"
        msg_id = "msg_" + secrets.token_hex(12)
        if fault is None:
            fake._deliver(self.job_id, self.url, event, body, status, None, retry=retry, msg_id=msg_id)
        elif fault.kind == "drop":
            fake._record_webhook(
                SentWebhook(
                    self.job_id,
                    event,
                    msg_id,
                    status,
                    self.url,
                    0,
                    False,
                    None,
                    None,
                    "drop",
                    time.time(),
                    body,
                )
            )
        elif fault.kind == "duplicate":
            fake._deliver(self.job_id, self.url, event, body, status, "duplicate", retry=retry, msg_id=msg_id)
            fake._deliver(self.job_id, self.url, event, body, status, "duplicate", retry=retry, msg_id=msg_id)
        elif fault.kind == "late":

            def late():
                if not fake._stopping.wait(fault.delay_s):
                    fake._deliver(
                        self.job_id, self.url, event, body, status, "late", retry=retry, msg_id=msg_id
                    )

            threading.Thread(target=late, daemon=True).start()
        elif fault.kind == "reorder":
            if self.held is None:
                self.held = (event, body, status, msg_id)
                return  # it goes out after the next message
            fake._deliver(self.job_id, self.url, event, body, status, None, retry=retry, msg_id=msg_id)
        else:
            raise ValueError(f"unknown webhook fault {fault.kind!r}")
        self._release_held()


# -- the fake ------------------------------------------------------------------------------------


class FakeReplicate:
    """The fake API server.  See the module docstring; all knobs are plain attributes."""

    def __init__(
        self,
        cog_predict_url: str | None = None,
        cog_train_url: str | None = None,
        *,
        cog_run_for: Callable[[str | None], str] | None = None,
        token: str = "r8_test_fake_token_0123456789abcdef",
        owner: str = "acme",
        account_name: str = "Acme Corp, Inc.",
        account_type: str = "organization",
        models: list[str] | tuple[str, ...] = (),
        openapi_schema: dict | None = None,
        trainer_model: str = TRAINER_MODEL,
        trainer_version: str | None = None,
        max_file_size: int = 100 * MiB,
        page_size: int = 100,
        webhook_throttle_s: float = 0.5,
        webhook_retry_delays: tuple[float, ...] = (0.1, 0.2, 0.4),
        webhook_timeout_s: float = 5.0,
        webhook_reorder_max_hold_s: float = 0.5,
        max_wait_s: float = 60.0,
        synthetic: SyntheticRun | None = None,
        validate_inputs: bool = True,
        cog_version: str = "0.23.1",
    ):
        self.cog_predict_url = cog_predict_url.rstrip("/") if cog_predict_url else None
        self.cog_train_url = cog_train_url.rstrip("/") if cog_train_url else None
        self.cog_run_for = cog_run_for
        self.token = token
        self.owner = owner
        self.account_name = account_name
        self.account_type = account_type
        self.max_file_size = max_file_size
        self.page_size = page_size
        self.webhook_throttle_s = webhook_throttle_s
        self.webhook_retry_delays = tuple(webhook_retry_delays)
        self.webhook_timeout_s = webhook_timeout_s
        self.webhook_reorder_max_hold_s = webhook_reorder_max_hold_s
        self.max_wait_s = max_wait_s
        self.synthetic = synthetic or SyntheticRun()
        self.validate_inputs = validate_inputs
        self.cog_version = cog_version
        self.webhook_secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
        self.openapi_schema = (
            openapi_schema
            if openapi_schema is not None
            else json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
        )

        self.requests: list[RequestRecord] = []
        self.sent_webhooks: list[SentWebhook] = []
        self.cog_requests: list[dict] = []  # what the fake sent to Cog: method, url, status, job_id
        self.http_faults: list[HttpFault] = []
        self.webhook_faults: list[WebhookFault] = []

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._seq = 0
        self._files: dict[str, _File] = {}
        self._models: dict[str, _Model] = {}
        self._versions: dict[str, tuple[_Model, _Version]] = {}
        self._jobs: dict[str, _Job] = {}
        self._blobs: dict[str, _Blob] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._http = httpx.Client(timeout=httpx.Timeout(webhook_timeout_s), follow_redirects=False)
        self._cog = httpx.Client(timeout=httpx.Timeout(60, connect=5))
        self.url = ""

        tm = self.add_model(
            trainer_model,
            visibility="public",
            hardware="gpu-h100",
            versions=0,
            description="Fine-tune Flux.1 and SDXL (LoRA and full) on Replicate's GPUs",
        )
        self.trainer_model = f"{tm.owner}/{tm.name}"
        self.trainer_version = self.add_version(self.trainer_model, version_id=trainer_version)
        for ref in models:
            self.add_model(ref)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> FakeReplicate:
        if self._server is None:
            self._server = _Server(self)
            self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="fake-replicate",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        with self._lock:
            running = [j for j in self._jobs.values() if not j.terminal]
            for job in running:
                job.canceled.set()
        for job in running:  # don't leave a session-scoped Cog server busy
            if job.cog_url and job.cog_accepted:
                self._cog_cancel(job)
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
            channels = [j.channel for j in self._jobs.values() if j.channel]
        for channel in channels:
            channel.wake()
        self._server.shutdown()
        self._server.server_close()
        with self._server.sock_lock:
            socks = list(self._server.open_sockets)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._http.close()
        self._cog.close()
        self._server = None

    def __enter__(self) -> FakeReplicate:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self, **kwargs) -> Any:
        """A ``replicate.Client`` pointed at this fake (typed Any: 1.0.7's models make every field
        Optional, and tests read them as the fake sends them)."""
        import replicate  # the real client, imported only by tests that ask for one

        # replicate exports Client lazily; pyright cannot see it (reportPrivateImportUsage)
        return replicate.Client(api_token=self.token, base_url=self.url, **kwargs)  # pyright: ignore

    # -- seeding ------------------------------------------------------------------------------------
    def add_model(
        self, ref: str, *, visibility: str = "private", hardware: str = "cpu", versions: int = 0, **fields
    ) -> _Model:
        owner, name = ref.split("/", 1)
        with self._lock:
            self._seq += 1
            model = _Model(
                owner=owner, name=name, visibility=visibility, hardware=hardware, seq=self._seq, **fields
            )
            self._models[ref] = model
        for _ in range(versions):
            self.add_version(ref)
        return model

    def model_hardware(self, ref: str) -> str | None:
        """The hardware a model was created with (Replicate's model object does not report it)."""
        with self._lock:
            m = self._models.get(ref)
            return m.hardware if m else None

    def add_version(
        self,
        ref: str,
        *,
        openapi_schema: dict | None = None,
        version_id: str | None = None,
        weights: str | None = None,
    ) -> str:
        with self._lock:
            model = self._models[ref]
            v = _Version(
                id=version_id or secrets.token_hex(32),
                created_at=_now(),
                cog_version=self.cog_version,
                openapi_schema=openapi_schema if openapi_schema is not None else self.openapi_schema,
                weights=weights,
            )
            model.versions.insert(0, v)
            self._versions[v.id] = (model, v)
            return v.id

    # -- fault injection ----------------------------------------------------------------------------
    def fail(
        self,
        pattern: str,
        status: int = 429,
        *,
        times: int | None = 1,
        method: str | None = None,
        retry_after: str | None = None,
    ) -> HttpFault:
        """The next ``times`` matching requests get ``status`` with Replicate's problem+json for it
        (429 and 503 carry ``Retry-After``, default ``"1"``; pass ``"0"`` for fast tests)."""
        if retry_after is None and status in (429, 503):
            retry_after = "1"
        return self._add_fault(
            HttpFault(pattern, "status", status=status, times=times, method=method, retry_after=retry_after)
        )

    def slow(
        self, pattern: str, delay_s: float, *, times: int | None = 1, method: str | None = None
    ) -> HttpFault:
        """Delay the next matching responses by ``delay_s`` (then answer normally)."""
        return self._add_fault(HttpFault(pattern, "delay", delay_s=delay_s, times=times, method=method))

    def drop(self, pattern: str, *, times: int | None = 1, method: str | None = None) -> HttpFault:
        """Close the connection without a response (after reading the request)."""
        return self._add_fault(HttpFault(pattern, "drop", times=times, method=method))

    def truncate(
        self,
        pattern: str,
        *,
        after_bytes: int | None = None,
        times: int | None = 1,
        method: str | None = None,
    ) -> HttpFault:
        """Send the headers (full Content-Length) and only ``after_bytes`` of the body (default
        half), then close: an interrupted download."""
        return self._add_fault(
            HttpFault(pattern, "truncate", after_bytes=after_bytes, times=times, method=method)
        )

    def webhook_fault(
        self,
        kind: str,
        *,
        event: str | None = None,
        times: int | None = 1,
        delay_s: float = 1.0,
        job_id: str | None = None,
    ) -> WebhookFault:
        if kind not in ("drop", "duplicate", "reorder", "late"):
            raise ValueError(kind)
        f = WebhookFault(kind, event=event, times=times, delay_s=delay_s, job_id=job_id)
        with self._lock:
            self.webhook_faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self._lock:
            self.http_faults.clear()
            self.webhook_faults.clear()

    def _add_fault(self, f: HttpFault) -> HttpFault:
        with self._lock:
            self.http_faults.append(f)
        return f

    def _take_http_faults(self, method: str, path: str) -> tuple[HttpFault | None, HttpFault | None]:
        delay = other = None
        with self._lock:
            for f in self.http_faults:
                if not f.matches(method, path):
                    continue
                if f.kind == "delay" and delay is None:
                    f.hits += 1
                    delay = f
                elif f.kind != "delay" and other is None:
                    f.hits += 1
                    other = f
        return delay, other

    def _take_webhook_fault(self, event: str, job_id: str) -> WebhookFault | None:
        with self._lock:
            for f in self.webhook_faults:
                if f.matches(event, job_id):
                    f.hits += 1
                    return f
        return None

    # -- inspection helpers ---------------------------------------------------------------------------
    def job(self, job_id: str) -> dict:
        """The job as GET returns it."""
        with self._lock:
            return self._json(self._jobs[job_id])

    def wait_until(
        self, predicate: Callable[[], Any], timeout: float = 10, what: str = "the condition"
    ) -> Any:
        """Wait until ``predicate()`` (called with the fake's lock held) is truthy and return it.  It
        is re-checked on every state change: job status, logs, output, a webhook attempt recorded."""
        end = time.monotonic() + timeout
        with self._changed:
            while True:
                got = predicate()
                if got:
                    return got
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fake Replicate: {what} did not happen within {timeout:g}s")
                self._changed.wait(left)

    def wait_for(self, job_id: str, statuses=TERMINAL, timeout: float = 30) -> dict:
        """The job (as GET returns it) once its status is one of ``statuses``."""

        def reached() -> dict | None:
            job = self._jobs[job_id]
            return self._json(job) if job.status in statuses else None

        return self.wait_until(
            reached,
            timeout,
            f"job {job_id} reaching {'/'.join(statuses)} (it is {self._jobs[job_id].status})",
        )

    def settled(self, job_id: str, timeout: float = 10) -> dict:
        """The job once nothing more will happen to it: terminal, its runner done and its webhooks
        sent (retries included).  Webhook faults sent on the side (``late``) are not waited for."""
        job = self.wait_for(job_id, timeout=timeout)
        with self._lock:
            threads = [
                t
                for t in (self._jobs[job_id].runner, getattr(self._jobs[job_id].channel, "thread", None))
                if t is not None
            ]
        end = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
            if t.is_alive():
                raise TimeoutError(
                    f"fake Replicate: job {job_id} still has {t.name} running after {timeout:g}s"
                )
        return job

    def count(self, method: str, pattern: str) -> int:
        """How many requests with this method hit a path matching the glob."""
        with self._lock:
            return sum(
                1 for r in self.requests if r.method == method and fnmatch.fnmatchcase(r.path, pattern)
            )

    def webhooks_for(self, job_id: str) -> list[SentWebhook]:
        with self._lock:
            return [w for w in self.sent_webhooks if w.job_id == job_id]

    def signing_key(self) -> bytes:
        return base64.b64decode(self.webhook_secret.split("_", 1)[1])

    # -- HTTP plumbing ----------------------------------------------------------------------------
    def _read_body(self, h: _Handler) -> bytes:
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = h.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
            return b"".join(chunks)
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""

    def _serve(self, h: _Handler) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(parsed.path)
        method = h.command
        body = self._read_body(h)
        req = _Req(method, path, urllib.parse.parse_qs(parsed.query), parsed.query, h.headers, body)
        auth = "Authorization" in h.headers
        delay, fault = self._take_http_faults(method, path)
        if delay is not None:
            self._stopping.wait(delay.delay_s)  # a simulated slow answer; stop() cuts it short
        status: int | None
        truncate_at = None
        if fault is not None and fault.kind == "drop":
            self._log(req, auth, None, "drop")
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault is not None and fault.kind == "status":
            resp = self._fault_response(fault)
        else:
            try:
                resp = self._route(req)
            except Exception as e:  # a bug in the fake shows up as a 500 with the reason
                resp = _problem(500, f"fake error: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            if fault is not None and fault.kind == "truncate":
                size = len(resp.body) if isinstance(resp.body, bytes) else 0
                truncate_at = fault.after_bytes if fault.after_bytes is not None else size // 2
        status = resp.status
        self._log(req, auth, status, fault.kind if fault else (delay.kind if delay else None))
        self._write(h, resp, head=method == "HEAD", truncate_at=truncate_at)

    def _log(self, req: _Req, auth: bool, status: int | None, fault: str | None) -> None:
        with self._lock:
            self.requests.append(
                RequestRecord(
                    req.method, req.path, req.raw_query, auth, len(req.body), status, fault, time.time()
                )
            )

    def _fault_response(self, f: HttpFault) -> _Resp:
        headers = {"Retry-After": f.retry_after} if f.retry_after is not None else {}
        if f.status == 402:
            resp = _problem(
                402,
                "You need to set up billing to run this model. Go to "
                "https://replicate.com/account/billing#billing to set it up. If you have recently "
                "set up billing, please wait a few minutes before trying again.",
                "Billing required",
            )
            resp.headers.update(headers)
            return resp
        detail = {
            429: "Request was throttled. Your rate limit resets in ~30s.",
            413: "Files must be less than 100MB in size",
            500: "Internal server error",
            502: "Bad gateway",
            503: "Service unavailable",
            504: "Gateway timeout",
        }.get(f.status, "Injected fault")
        resp = _problem(f.status, detail)
        resp.headers.update(headers)
        return resp

    def _write(self, h: _Handler, resp: _Resp, *, head: bool = False, truncate_at: int | None = None) -> None:
        if isinstance(resp.body, (dict, list)):
            data = json.dumps(resp.body).encode()
        elif isinstance(resp.body, bytes):
            data = resp.body
        elif resp.body is None:
            data = b""
        else:
            data = str(resp.body).encode()
        try:
            h.send_response(resp.status)
            if resp.status != 204:
                h.send_header("Content-Type", resp.content_type)
                h.send_header("Content-Length", str(len(data)))
            for k, v in resp.headers.items():
                h.send_header(k, v)
            if truncate_at is not None:
                h.send_header("Connection", "close")
            h.end_headers()
            if head or resp.status == 204:
                return
            if truncate_at is not None:
                h.wfile.write(data[:truncate_at])
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            h.wfile.write(data)
        except OSError:
            h.close_connection = True

    # -- routing ----------------------------------------------------------------------------------
    _ROUTES: list[tuple[str, str, str, bool]] = [
        # (method, regex, handler name, needs auth)
        ("GET", r"/v1/account", "_account", True),
        ("POST", r"/v1/files", "_files_create", True),
        ("GET", r"/v1/files/(?P<fid>[^/]+)", "_files_get", True),
        ("GET", r"/v1/hardware", "_hardware", True),
        ("POST", r"/v1/models", "_models_create", True),
        ("GET", r"/v1/models/(?P<o>[^/]+)/(?P<n>[^/]+)", "_models_get", True),
        ("GET", r"/v1/models/(?P<o>[^/]+)/(?P<n>[^/]+)/versions", "_versions_list", True),
        (
            "POST",
            r"/v1/models/(?P<o>[^/]+)/(?P<n>[^/]+)/versions/(?P<v>[^/]+)/trainings",
            "_trainings_create",
            True,
        ),
        ("POST", r"/v1/models/(?P<o>[^/]+)/(?P<n>[^/]+)/predictions", "_model_predictions_create", True),
        ("POST", r"/v1/predictions", "_predictions_create", True),
        ("GET", r"/v1/predictions", "_predictions_list", True),
        ("GET", r"/v1/predictions/(?P<id>[^/]+)", "_predictions_get", True),
        ("POST", r"/v1/predictions/(?P<id>[^/]+)/cancel", "_predictions_cancel", True),
        ("GET", r"/v1/trainings", "_trainings_list", True),
        ("GET", r"/v1/trainings/(?P<id>[^/]+)", "_trainings_get", True),
        ("POST", r"/v1/trainings/(?P<id>[^/]+)/cancel", "_trainings_cancel", True),
        ("GET", r"/v1/webhooks/default/secret", "_webhook_secret", True),
        ("GET", r"/_fake/files/(?P<fid>[^/]+)(?:/.*)?", "_raw_file", False),
        ("HEAD", r"/_fake/files/(?P<fid>[^/]+)(?:/.*)?", "_raw_file", False),
        ("GET", r"/_fake/outputs/(?P<id>[^/]+)/(?P<name>[^/]+)", "_raw_output", False),
        ("HEAD", r"/_fake/outputs/(?P<id>[^/]+)/(?P<name>[^/]+)", "_raw_output", False),
        ("POST", r"/_fake/cog-webhook/(?P<id>[^/]+)", "_cog_webhook", False),
    ]
    _COMPILED = [(m, re.compile(rx + "/?"), name, auth) for m, rx, name, auth in _ROUTES]

    def _route(self, req: _Req) -> _Resp:
        allowed = False
        for method, rx, name, needs_auth in self._COMPILED:
            m = rx.fullmatch(req.path)
            if not m:
                continue
            if method != req.method:
                allowed = True
                continue
            if needs_auth and not self._authorized(req):
                return _problem(401, "You did not pass a valid authentication token", "Unauthenticated")
            resp = getattr(self, name)(req, **m.groupdict())
            if req.path.startswith("/v1/"):
                create = req.method == "POST" and name in ("_predictions_create", "_model_predictions_create")
                resp.headers.setdefault("ratelimit-remaining", "599" if create else "2999")
                resp.headers.setdefault("ratelimit-reset", "1")
            return resp
        if allowed:
            return _problem(405, f'Method "{req.method}" not allowed.')
        return _not_found()

    def _authorized(self, req: _Req) -> bool:
        value = req.headers.get("Authorization") or ""
        scheme, _, token = value.partition(" ")
        return scheme.lower() in ("bearer", "token") and hmac.compare_digest(
            token.strip().encode(), self.token.encode()
        )

    def _body_json(self, req: _Req) -> dict | _Resp:
        """The request's JSON object, or the 400 to answer instead."""
        try:
            body = req.json()
        except (ValueError, UnicodeDecodeError):
            return _problem(400, "JSON parse error - request body is not valid JSON", "Bad request")
        if not isinstance(body, dict):
            return _problem(400, "Request body must be a JSON object", "Bad request")
        return body

    def _page(self, items: list, dump: Callable[[Any], dict]) -> _Resp:
        """The first page, newest first.  The client reads only the first page of a list (as
        1.0.7's ``versions.list()`` does), so no cursors are served: ``next`` stays null."""
        return _Resp(
            200,
            {"next": None, "previous": None, "results": [dump(x) for x in items[: max(1, self.page_size)]]},
        )

    # -- account, hardware, secret ----------------------------------------------------------------
    def _account(self, req: _Req) -> _Resp:
        return _Resp(
            200,
            {
                "type": self.account_type,
                "username": self.owner,
                "name": self.account_name,
                "github_url": f"https://github.com/{self.owner}",
            },
        )

    def _hardware(self, req: _Req) -> _Resp:
        return _Resp(200, list(HARDWARE))

    def _webhook_secret(self, req: _Req) -> _Resp:
        return _Resp(200, {"key": self.webhook_secret})

    # -- files ------------------------------------------------------------------------------------
    def _file_json(self, f: _File) -> dict:
        return {
            "id": f.id,
            "name": f.name,
            "content_type": f.content_type,
            "size": len(f.data),
            "etag": hashlib.md5(f.data).hexdigest(),
            "checksums": {
                "sha256": hashlib.sha256(f.data).hexdigest(),
                "md5": hashlib.md5(f.data).hexdigest(),
            },
            "metadata": f.metadata,
            "created_at": _iso(f.created_at),
            "expires_at": _iso(f.created_at + timedelta(hours=24)),
            "urls": {"get": f"{self.url}/v1/files/{f.id}"},
        }

    def download_url(self, file_id: str) -> str:
        """The unauthenticated loopback URL of an uploaded file's bytes (what Cog downloads)."""
        with self._lock:
            f = self._files[file_id]
            return f"{self.url}/_fake/files/{f.id}/{urllib.parse.quote(f.name)}"

    def _files_create(self, req: _Req) -> _Resp:
        ctype = req.headers.get("Content-Type") or ""
        if not ctype.lower().startswith("multipart/form-data"):
            return _problem(415, "Unsupported media type: use multipart/form-data", "Unsupported media type")
        try:
            parts = _parse_multipart(req.body, ctype)
        except ValueError as e:
            return _problem(400, f"Malformed multipart body: {e}", "Bad request")
        content = next((p for p in parts if p["name"] == "content"), None)
        if content is None:
            return _invalid_fields(
                [{"type": "required", "field": "content", "description": "content is required"}]
            )
        if len(content["data"]) > self.max_file_size:
            return _problem(413, "Files must be less than 100MB in size")
        fields = {p["name"]: p["data"].decode("utf-8", "replace") for p in parts if p["filename"] is None}
        name = fields.get("filename") or content["filename"] or "file"
        if len(name.encode()) > 255:
            return _invalid_fields(
                [
                    {
                        "type": "max_length",
                        "field": "filename",
                        "description": "filename must be at most 255 bytes",
                    }
                ]
            )
        ctype_part = fields.get("type") or content["content_type"] or "application/octet-stream"
        try:
            metadata = json.loads(fields["metadata"]) if fields.get("metadata") else {}
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict):
            return _invalid_fields(
                [{"type": "invalid", "field": "metadata", "description": "metadata must be a JSON object"}]
            )
        with self._lock:
            self._seq += 1
            f = _File(_file_id(), name, ctype_part, content["data"], metadata, _now(), self._seq)
            self._files[f.id] = f
            return _Resp(201, self._file_json(f))

    def _files_get(self, req: _Req, fid: str) -> _Resp:
        with self._lock:
            f = self._files.get(fid)
            return _Resp(200, self._file_json(f)) if f else _not_found()

    def _raw_file(self, req: _Req, fid: str) -> _Resp:
        with self._lock:
            f = self._files.get(fid)
        if f is None:
            return _not_found()
        return _blob_response(req, _Blob(f.data, f.content_type, hashlib.md5(f.data).hexdigest()))

    def _raw_output(self, req: _Req, id: str, name: str) -> _Resp:
        with self._lock:
            blob = self._blobs.get(f"{id}/{name}")
        return _blob_response(req, blob) if blob else _not_found()

    # -- models and versions ----------------------------------------------------------------------
    @staticmethod
    def _version_json(v: _Version) -> dict:
        return {
            "id": v.id,
            "created_at": _iso(v.created_at),
            "cog_version": v.cog_version,
            "openapi_schema": v.openapi_schema,
        }

    def _model_json(self, m: _Model) -> dict:
        return {
            "url": f"https://replicate.com/{m.owner}/{m.name}",
            "owner": m.owner,
            "name": m.name,
            "description": m.description,
            "visibility": m.visibility,
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "cover_image_url": None,
            "run_count": m.run_count,
            "default_example": None,
            "latest_version": self._version_json(m.versions[0]) if m.versions else None,
            "is_official": False,
        }

    def _models_create(self, req: _Req) -> _Resp:
        body = self._body_json(req)
        if isinstance(body, _Resp):
            return body
        missing = [k for k in ("owner", "name", "visibility", "hardware") if not body.get(k)]
        if missing:
            return _invalid_fields(
                [{"type": "required", "field": k, "description": f"{k} is required"} for k in missing]
            )
        if body["visibility"] not in ("public", "private"):
            return _invalid_fields(
                [
                    {
                        "type": "enum",
                        "field": "visibility",
                        "description": "visibility must be one of: public, private",
                    }
                ]
            )
        if body["hardware"] not in {h["sku"] for h in HARDWARE}:
            return _invalid_fields(
                [
                    {
                        "type": "enum",
                        "field": "hardware",
                        "description": f"{body['hardware']!r} is not a valid hardware SKU",
                    }
                ]
            )
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", body["name"]):
            return _invalid_fields(
                [
                    {
                        "type": "pattern",
                        "field": "name",
                        "description": "name may contain lowercase letters, digits, '-', '_' and '.'",
                    }
                ]
            )
        if body["owner"] != self.owner:
            return _problem(403, "You do not have permission to create models for this owner.", "Forbidden")
        ref = f"{body['owner']}/{body['name']}"
        with self._lock:
            if ref in self._models:
                return _problem(409, f"A model named {ref} already exists.", "Model already exists")
            m = self.add_model(
                ref,
                visibility=body["visibility"],
                hardware=body["hardware"],
                description=body.get("description"),
            )
            return _Resp(201, self._model_json(m))

    def _models_get(self, req: _Req, o: str, n: str) -> _Resp:
        with self._lock:
            m = self._models.get(f"{o}/{n}")
            return _Resp(200, self._model_json(m)) if m else _not_found()

    def _versions_list(self, req: _Req, o: str, n: str) -> _Resp:
        with self._lock:
            m = self._models.get(f"{o}/{n}")
            if m is None:
                return _not_found()
            return self._page(m.versions, self._version_json)  # kept newest first

    # -- jobs: JSON -------------------------------------------------------------------------------
    def _json(self, job: _Job, *, create: bool = False) -> dict:
        kind = "predictions" if job.kind == "prediction" or create else "trainings"
        metrics = dict(job.metrics)
        out: dict[str, Any] = {
            "id": job.id,
            "model": job.model,
            "version": job.version,
            "input": job.input,
            "logs": job.logs,
            "output": job.output,
            "error": job.error,
            "status": job.status,
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "completed_at": _iso(job.completed_at),
            "urls": {
                "get": f"{self.url}/v1/{kind}/{job.id}",
                "cancel": f"{self.url}/v1/{kind}/{job.id}/cancel",
                "web": f"https://replicate.com/p/{job.id}",
            },
            "metrics": metrics,
            "source": "api",
        }
        if job.kind == "prediction":
            out["data_removed"] = False
        else:
            out["webhook_completed"] = None
        return out

    def _dump(self, job: _Job) -> str:
        return json.dumps(self._json(job))

    # -- jobs: create -----------------------------------------------------------------------------
    def _resolve_version(self, ref: Any) -> tuple[_Model, _Version] | None:
        if not isinstance(ref, str) or not ref:
            return None
        if _HEX64.match(ref):
            return self._versions.get(ref)
        m = re.fullmatch(r"([^/]+)/([^/:]+)(?::(.+))?", ref)
        if not m:
            return None
        model = self._models.get(f"{m.group(1)}/{m.group(2)}")
        if model is None:
            return None
        if m.group(3) is None:
            return (model, model.versions[0]) if model.versions else None
        hit = self._versions.get(m.group(3))
        return hit if hit and hit[0] is model else None

    def _check_input(self, version: _Version, inp: Any, component: str) -> _Resp | None:
        if not isinstance(inp, dict):
            return _invalid_fields(
                [{"type": "type", "field": "input", "description": "input must be an object"}]
            )
        if not self.validate_inputs:
            return None
        schemas = (version.openapi_schema or {}).get("components", {}).get("schemas", {})
        if component not in schemas:
            component = "Input"
            if component not in schemas:
                return None
        fields: list[dict] = []
        root = {
            "$ref": f"#/components/schemas/{component}",
            "components": version.openapi_schema["components"],
        }
        for e in sorted(jsonschema.Draft202012Validator(root).iter_errors(inp), key=lambda e: list(e.path)):
            if e.validator == "required":
                name = e.message.split("'")[1] if "'" in e.message else e.message
                fields.append({"type": "required", "field": "input", "description": f"{name} is required"})
            else:
                where = ".".join(str(p) for p in e.absolute_path)
                fields.append(
                    {
                        "type": str(e.validator),
                        "field": f"input.{where}" if where else "input",
                        "description": e.message,
                    }
                )
        return _invalid_fields(fields) if fields else None

    def _webhook_params(self, body: dict) -> tuple[tuple[str, ...], _Resp | None]:
        events = body.get("webhook_events_filter")
        if events is None:
            return EVENTS, None
        if not isinstance(events, list) or any(e not in EVENTS for e in events):
            return EVENTS, _invalid_fields(
                [
                    {
                        "type": "enum",
                        "field": "webhook_events_filter",
                        "description": "webhook_events_filter items must be one of: " + ", ".join(EVENTS),
                    }
                ]
            )
        return tuple(events), None

    def _new_job(
        self,
        kind: str,
        model: _Model,
        version: _Version,
        body: dict,
        events: tuple[str, ...],
        destination: str | None = None,
    ) -> _Job:
        self._seq += 1
        job = _Job(
            kind=kind,
            id=_job_id(),
            model=f"{model.owner}/{model.name}",
            version=version.id,
            input=body.get("input") or {},
            created_at=_now(),
            seq=self._seq,
            webhook=body.get("webhook"),
            events=events,
            destination=destination,
        )
        job.cog_url = self.cog_predict_url if kind == "prediction" else self.cog_train_url
        if kind == "prediction" and self.cog_run_for is not None:
            # as on Replicate: the version's image in run mode, COG_WEIGHTS = its training's weights
            job.cog_url, job.cog_weights, job.cog_resolve = None, version.weights, True
        if job.cog_url is None and not job.cog_resolve:
            job.synthetic = SyntheticRun(**asdict(self.synthetic))
        model.run_count += 1
        self._jobs[job.id] = job
        if job.webhook:
            job.channel = _WebhookChannel(self, job)
            job.channel.notify("start", self._dump(job), job.status)
        runner = self._run_cog if (job.cog_url or job.cog_resolve) else self._run_synthetic
        job.runner = threading.Thread(target=runner, args=(job,), name=f"job-{job.id}", daemon=True)
        job.runner.start()
        return job

    def _create_prediction(self, req: _Req, body: dict, hit: tuple[_Model, _Version] | None) -> _Resp:
        if hit is None:
            return _invalid_version()
        bad = self._check_input(hit[1], {} if body.get("input") is None else body["input"], "Input")
        if bad:
            return bad
        events, bad = self._webhook_params(body)
        if bad:
            return bad
        prefer = (req.headers.get("Prefer") or "").strip()
        wait = None
        if _PREFER_WAIT.match(prefer):
            wait = float(prefer.partition("=")[2] or self.max_wait_s)
        with self._lock:
            job = self._new_job("prediction", hit[0], hit[1], body, events)
            if wait is None:
                return _Resp(201, self._json(job))
            end = time.monotonic() + min(wait, self.max_wait_s)
            while not job.terminal and not self._stopping.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            out = self._json(job)
            done = job.terminal
        if not done:
            out["status"] = "starting"  # the 1.0.7 client's run() polls only on "starting"
        return _Resp(201 if done else 202, out, {"Preference-Applied": prefer})

    def _predictions_create(self, req: _Req) -> _Resp:
        body = self._body_json(req)
        if isinstance(body, _Resp):
            return body
        with self._lock:
            hit = self._resolve_version(body.get("version"))
        return self._create_prediction(req, body, hit)

    def _model_predictions_create(self, req: _Req, o: str, n: str) -> _Resp:
        body = self._body_json(req)
        if isinstance(body, _Resp):
            return body
        with self._lock:
            m = self._models.get(f"{o}/{n}")
            if m is None:
                return _not_found(f"Model {o}/{n} not found.")
            hit = (m, m.versions[0]) if m.versions else None
        return self._create_prediction(req, body, hit)

    def _trainings_create(self, req: _Req, o: str, n: str, v: str) -> _Resp:
        body = self._body_json(req)
        if isinstance(body, _Resp):
            return body
        with self._lock:
            hit = self._versions.get(v)
            if hit is None or f"{hit[0].owner}/{hit[0].name}" != f"{o}/{n}":
                return _invalid_version()
            dest = body.get("destination")
            dm = self._models.get(dest) if isinstance(dest, str) else None
            if dm is None or dm.owner != self.owner:
                return _problem(404, "The specified training destination does not exist")
        bad = self._check_input(hit[1], {} if body.get("input") is None else body["input"], "TrainingInput")
        if bad:
            return bad
        events, bad = self._webhook_params(body)
        if bad:
            return bad
        with self._lock:
            job = self._new_job("training", hit[0], hit[1], body, events, destination=dest)
            return _Resp(201, self._json(job, create=True))

    # -- jobs: read, list, cancel -----------------------------------------------------------------
    def _predictions_get(self, req: _Req, id: str) -> _Resp:
        with self._lock:
            job = self._jobs.get(id)  # a training id works too: the create response points here
            return _Resp(200, self._json(job)) if job else _not_found()

    def _trainings_get(self, req: _Req, id: str) -> _Resp:
        with self._lock:
            job = self._jobs.get(id)
            return _Resp(200, self._json(job)) if job and job.kind == "training" else _not_found()

    def _list_jobs(self, kind: str) -> _Resp:
        with self._lock:
            jobs = sorted(
                (j for j in self._jobs.values() if j.kind == kind), key=lambda j: j.seq, reverse=True
            )
            return self._page(jobs, self._json)

    def _predictions_list(self, req: _Req) -> _Resp:
        return self._list_jobs("prediction")

    def _trainings_list(self, req: _Req) -> _Resp:
        return self._list_jobs("training")

    def _predictions_cancel(self, req: _Req, id: str) -> _Resp:
        job = self._cancel(id)
        return _Resp(200, job) if job else _not_found()

    def _trainings_cancel(self, req: _Req, id: str) -> _Resp:
        with self._lock:
            known = id in self._jobs and self._jobs[id].kind == "training"
        job = self._cancel(id) if known else None
        return _Resp(200, job) if job else _not_found()

    def _cancel(self, job_id: str) -> dict | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.terminal:
                return self._json(job)
            forward = job.cog_url is not None and job.cog_accepted
            self._finish(job, "canceled")
            out = self._json(job)
        if forward:
            self._cog_cancel(job)
        return out

    # -- jobs: state changes (call with the lock held) --------------------------------------------
    def _mark_processing(self, job: _Job) -> None:
        if job.status == "starting":
            job.status = "processing"
        if job.started_at is None:
            job.started_at = _now()
        self._changed.notify_all()

    def _set_logs(self, job: _Job, logs: str) -> None:
        if len(logs) > len(job.logs):
            job.logs = logs
            self._changed.notify_all()
            if job.channel and "logs" in job.events:
                job.channel.notify("logs")

    def _set_output(self, job: _Job, output: Any) -> None:
        if output != job.output:
            job.output = output
            self._changed.notify_all()
            if job.channel and "output" in job.events:
                job.channel.notify("output")

    def _finish(
        self,
        job: _Job,
        status: str,
        *,
        output: Any = None,
        error: str | None = None,
        predict_time: float | None = None,
    ) -> None:
        if job.terminal:
            return  # never regress (or re-finish) a terminal job
        now = _now()
        if status == "canceled":
            job.canceled.set()
        job.status = status
        if job.started_at is None and status != "canceled":
            job.started_at = now
        job.completed_at = now
        if status == "succeeded":
            job.output = output
        elif status == "failed":
            job.error = error or "Prediction failed"
        if predict_time is None:
            predict_time = (now - job.started_at).total_seconds() if job.started_at else 0.0
        job.metrics = {
            "predict_time": round(predict_time, 6),
            "total_time": round((now - job.created_at).total_seconds(), 6),
        }
        self._changed.notify_all()
        if job.channel:
            job.channel.notify("completed", self._dump(job), job.status)

    def _store_output(self, job: _Job, name: str, data: bytes, content_type: str) -> str:
        self._blobs[f"{job.id}/{name}"] = _Blob(data, content_type, hashlib.md5(data).hexdigest())
        return f"{self.url}/_fake/outputs/{job.id}/{urllib.parse.quote(name)}"

    def _convert_output(self, job: _Job, value: Any, stem: str = "output") -> Any:
        """``data:`` URIs (what Cog returns) become stored blobs served by the fake."""
        if isinstance(value, str) and value.startswith("data:"):
            try:
                data, ctype = _decode_data_uri(value)
            except ValueError:
                return value
            return self._store_output(job, stem + _extension(ctype, data), data, ctype)
        if isinstance(value, list):
            return [self._convert_output(job, v, f"{stem}_{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self._convert_output(job, v, k) for k, v in value.items()}
        return value

    def _training_output(self, job: _Job, converted: Any) -> dict:
        """What Replicate makes of a training's output: its file becomes ``weights`` and a new version
        of the destination (the trainer's image, with those weights as COG_WEIGHTS)."""
        out = dict(converted) if isinstance(converted, dict) else {"weights": converted}
        vid = secrets.token_hex(32)
        if job.destination in self._models:
            trainer = self._versions.get(job.version)
            schema = trainer[1].openapi_schema if trainer else self.openapi_schema
            weights = out.get("weights") if isinstance(out.get("weights"), str) else None
            self.add_version(job.destination, openapi_schema=schema, version_id=vid, weights=weights)
        return {"version": f"{job.destination}:{vid}", **{k: v for k, v in out.items() if k != "version"}}

    # -- jobs: synthetic --------------------------------------------------------------------------
    def _run_synthetic(self, job: _Job) -> None:
        syn = job.synthetic
        assert syn is not None
        if self._stopping.is_set():
            return
        with self._lock:
            if job.terminal:
                return
            self._mark_processing(job)
            started = time.monotonic()
        lines = syn.lines()
        gap = syn.duration_s / max(len(lines), 1)
        logs = ""
        for line in lines:
            if job.canceled.wait(gap) or self._stopping.is_set():
                return
            logs += line + "\n"
            with self._lock:
                if job.terminal:
                    return
                self._set_logs(job, logs)
        if not lines and job.canceled.wait(syn.duration_s):
            return
        with self._lock:
            if job.terminal:
                return
            predict_time = syn.predict_time if syn.predict_time is not None else time.monotonic() - started
            if syn.status == "succeeded":
                if job.kind == "prediction":  # the run entry renders images
                    output = [self._store_output(job, "out-0.png", tiny_png(), "image/png")]
                else:
                    url = self._store_output(job, "output.zip", tiny_zip(), "application/zip")
                    output = self._training_output(job, {"weights": url})
                self._finish(job, "succeeded", output=output, predict_time=predict_time)
            else:
                self._finish(
                    job,
                    syn.status,
                    error=syn.error if syn.status == "failed" else None,
                    predict_time=predict_time,
                )

    # -- jobs: on the real Cog server -------------------------------------------------------------
    def _rewrite_input(self, value: Any) -> Any:
        if isinstance(value, str):
            m = re.fullmatch(re.escape(self.url) + r"/v1/files/([^/?#]+)/?", value)
            if m and m.group(1) in self._files:
                return self.download_url(m.group(1))
            return value
        if isinstance(value, list):
            return [self._rewrite_input(v) for v in value]
        if isinstance(value, dict):
            return {k: self._rewrite_input(v) for k, v in value.items()}
        return value

    def _run_cog(self, job: _Job) -> None:
        path = "/predictions" if job.kind == "prediction" else "/trainings"
        if job.cog_resolve:
            assert self.cog_run_for is not None
            try:  # may start a server (seconds): outside the lock
                url = self.cog_run_for(job.cog_weights).rstrip("/")
            except Exception as e:  # noqa: BLE001 - the version cannot boot: the prediction fails
                with self._lock:
                    self._finish(job, "failed", error=f"the model version could not start: {e}")
                return
            with self._lock:
                job.cog_url = url
        assert job.cog_url is not None
        target = job.cog_url + path
        with self._lock:
            body = {
                "id": job.id,
                "input": self._rewrite_input(job.input),
                "webhook": f"{self.url}/_fake/cog-webhook/{job.id}",
                "webhook_events_filter": list(EVENTS),
            }
        failures = 0
        while not job.canceled.is_set() and not self._stopping.is_set():
            try:
                r = self._cog.post(target, json=body, headers={"Prefer": "respond-async"})
            except httpx.HTTPError as e:
                self.cog_requests.append(
                    {"method": "POST", "url": target, "status": None, "job_id": job.id, "error": repr(e)}
                )
                failures += 1
                if failures >= 20:
                    with self._lock:
                        self._finish(job, "failed", error=f"could not reach the model server: {e}")
                    return
                job.canceled.wait(0.5)  # a retry interval; a cancel (stop() cancels too) ends it
                continue
            self.cog_requests.append(
                {"method": "POST", "url": target, "status": r.status_code, "job_id": job.id}
            )
            if r.status_code in (409, 503):  # slot busy / setup not finished: the job stays queued
                job.canceled.wait(0.2)
                continue
            if r.status_code in (200, 202):
                with self._lock:
                    job.cog_accepted = True
                    canceled = job.canceled.is_set()
                if canceled:  # canceled while the POST was in flight
                    self._cog_cancel(job)
                return
            with self._lock:
                self._finish(job, "failed", error=_cog_error(r))
            return

    def _cog_cancel(self, job: _Job) -> None:
        path = "/predictions" if job.kind == "prediction" else "/trainings"
        url = f"{job.cog_url}{path}/{job.id}/cancel"
        try:
            r = self._cog.post(url, timeout=10)
            self.cog_requests.append(
                {"method": "POST", "url": url, "status": r.status_code, "job_id": job.id}
            )
        except httpx.HTTPError as e:
            self.cog_requests.append(
                {"method": "POST", "url": url, "status": None, "job_id": job.id, "error": repr(e)}
            )

    def _cog_webhook(self, req: _Req, id: str) -> _Resp:
        try:
            payload = req.json()
        except ValueError:
            return _problem(400, "bad JSON")
        with self._lock:
            job = self._jobs.get(id)
            if job is None:
                return _not_found()
            if job.terminal:
                return _Resp(200, {})  # late or reordered hook: a terminal status is final
            status = payload.get("status")
            logs = payload.get("logs") or ""
            if status in TERMINAL:
                if job.started_at is None:
                    job.started_at = _now()
                if len(logs) > len(job.logs):
                    job.logs = logs
                predict_time = (payload.get("metrics") or {}).get("predict_time")
                output = None
                if status == "succeeded":
                    output = self._convert_output(job, payload.get("output"))
                    if job.kind == "training":
                        output = self._training_output(job, output)
                self._finish(
                    job, status, output=output, error=payload.get("error"), predict_time=predict_time
                )
            else:
                self._mark_processing(job)
                self._set_logs(job, logs)
                if payload.get("output") is not None:
                    self._set_output(job, self._convert_output(job, payload["output"]))
        return _Resp(200, {})

    # -- outgoing webhooks ------------------------------------------------------------------------
    def sign(self, msg_id: str, timestamp: int, body: str) -> str:
        digest = hmac.new(
            self.signing_key(), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256
        ).digest()
        return "v1," + base64.b64encode(digest).decode()

    def _record_webhook(self, rec: SentWebhook) -> None:
        with self._changed:
            self.sent_webhooks.append(rec)
            self._changed.notify_all()

    def _deliver(
        self,
        job_id: str,
        url: str,
        event: str,
        body: str,
        status: str,
        fault: str | None,
        *,
        retry: bool,
        msg_id: str | None = None,
    ) -> bool:
        msg_id = msg_id or "msg_" + secrets.token_hex(12)
        delays = self.webhook_retry_delays if retry else ()
        for attempt in range(len(delays) + 1):
            if attempt and self._stopping.wait(delays[attempt - 1]):
                return False
            sent_at = time.time()
            ts = int(sent_at)
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "fake-replicate-webhooks/1.0",
                "webhook-id": msg_id,
                "webhook-timestamp": str(ts),
                "webhook-signature": self.sign(msg_id, ts, body),
            }
            code = err = None
            try:
                r = self._http.post(url, content=body.encode(), headers=headers)
                code = r.status_code
            except (httpx.HTTPError, RuntimeError) as e:
                err = repr(e)
            ok = code is not None and 200 <= code < 300
            self._record_webhook(
                SentWebhook(
                    job_id, event, msg_id, status, url, attempt + 1, ok, code, err, fault, sent_at, body
                )
            )
            if ok or (code is not None and code < 400):  # 3xx: redirects are not followed, nor retried
                return ok
        return False


# -- module helpers --------------------------------------------------------------------------------


def _parse_multipart(body: bytes, content_type: str) -> list[dict]:
    m = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type)
    if not m:
        raise ValueError("no boundary")
    boundary = (m.group(1) or m.group(2)).encode()
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary)
    if len(chunks) < 3:
        raise ValueError("no parts")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("part without headers")
        headers = {}
        for line in head.split(b"\r\n"):
            if b":" in line:
                k, _, v = line.decode("utf-8", "replace").partition(":")
                headers[k.strip().lower()] = v.strip()
        disp = headers.get("content-disposition", "")
        params = {}
        for pm in re.finditer(r';\s*([\w*]+)=("(?:[^"\\]|\\.)*"|[^;]*)', disp):
            v = pm.group(2)
            if v.startswith('"'):
                v = v[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            params[pm.group(1).lower()] = v.replace("%22", '"')
        filename = params.get("filename")
        if "filename*" in params:
            enc, _, rest = params["filename*"].partition("''")
            filename = urllib.parse.unquote(rest, encoding=enc or "utf-8")
        parts.append(
            {
                "name": params.get("name"),
                "filename": filename,
                "content_type": headers.get("content-type"),
                "data": data,
            }
        )
    return parts


def _decode_data_uri(uri: str) -> tuple[bytes, str]:
    head, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ValueError("not a data URI")
    meta = head.split(";")
    ctype = meta[0] or "text/plain"
    if "base64" in meta[1:]:
        try:
            return base64.b64decode(payload), ctype
        except binascii.Error as e:
            raise ValueError(str(e)) from e
    return urllib.parse.unquote_to_bytes(payload), ctype


def _extension(ctype: str, data: bytes) -> str:
    if data[:4] == b"PK\x03\x04" or ctype == "application/zip":
        return ".zip"
    if ctype == "application/octet-stream":
        return ".bin"
    return mimetypes.guess_extension(ctype) or ".bin"


def _cog_error(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return f"model server answered {r.status_code}: {r.text[:500]}"
    if r.status_code == 422 and isinstance(body.get("detail"), list):
        msgs = "; ".join(
            f"{'.'.join(str(x) for x in d.get('loc', [])[2:])}: {d.get('msg')}" for d in body["detail"]
        )
        return f"Input validation failed: {msgs}"
    return f"model server answered {r.status_code}: {body.get('error') or body.get('detail') or body}"


def _blob_response(req: _Req, blob: _Blob) -> _Resp:
    """200, or 206 for ``Range: bytes=START-[END]`` (how the client resumes a download), 416 when
    START is past the end; any other Range form is ignored (a full 200), as HTTP allows."""
    size = len(blob.data)
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{blob.etag}"', "Cache-Control": "public, max-age=3600"}
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", (req.headers.get("Range") or "").strip())
    if m is None:
        return _Resp(200, blob.data, headers, blob.content_type)
    start = int(m.group(1))
    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    if start >= size or end < start:
        return _Resp(416, b"", {**headers, "Content-Range": f"bytes */{size}"}, blob.content_type)
    return _Resp(
        206,
        blob.data[start : end + 1],
        {**headers, "Content-Range": f"bytes {start}-{end}/{size}"},
        blob.content_type,
    )
