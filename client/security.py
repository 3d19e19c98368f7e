"""The local server's own security: a server on a laptop that holds an API token is a target,
and a page from any other site can try to reach it on localhost.

One ASGI middleware, in front of every route:
- Host allow-list (DNS rebinding): the Host header must name this server — loopback names, the
  bound address, the public URL's host, or an extra name the user allowed. Otherwise 421.
- CSRF: a state-changing request (POST/PUT/PATCH/DELETE) that a browser marks as coming from
  another origin (``Origin`` not one of ours, or ``Sec-Fetch-Site: cross-site``/``same-site``)
  is refused with 403. Browsers always send these on cross-origin writes; tools send neither.
  The webhook routes are exempt (they are authenticated by signature or key instead).
- Authentication when bound to anything but loopback: every route except the webhooks (and the
  page's static files, which hold no data and carry the login form) needs the API key (``Authorization: Bearer <key>`` or ``X-API-Key``) or a session cookie obtained
  with it (``POST /api/session``); otherwise 401.
- Body-size limits per route kind, enforced on Content-Length and while streaming.
- Headers on every response: a Content-Security-Policy without inline script, nosniff, frame
  denial, no referrer, no caching of API responses.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
SESSION_COOKIE = "at_session"
WEBHOOK_PREFIX = "/api/webhooks/"
MiB = 2**20
LIMITS = {"upload": 110 * MiB, "webhook": 8 * MiB, "default": 1 * MiB}
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, int | None]:
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1 :]
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, int(port) if port.isdigit() else None
    return value, None


@dataclass
class Policy:
    """What the middleware allows; rebuilt from the settings on every request."""

    bind_host: str
    port: int
    public_url: str | None = None
    extra_hosts: list[str] = field(default_factory=list)
    api_key_hash: str | None = None  # sha256 hex of the API key; required when not on loopback

    def allowed_hosts(self) -> set[str]:
        hosts = set(LOOPBACK_NAMES) | {h.lower() for h in self.extra_hosts}
        if self.bind_host not in ("0.0.0.0", "::", ""):
            hosts.add(self.bind_host.lower().strip("[]"))
        if self.public_url:
            hosts.add((urlsplit(self.public_url).hostname or "").lower())
        return hosts

    def allowed_origins(self) -> set[str]:
        origins = set()
        for h in self.allowed_hosts():
            shown = f"[{h}]" if ":" in h else h
            origins.add(f"http://{shown}:{self.port}")
            origins.add(f"https://{shown}:{self.port}")
        if self.public_url:
            p = urlsplit(self.public_url)
            origins.add(f"{p.scheme}://{p.netloc}".lower())
        return origins

    @property
    def needs_auth(self) -> bool:
        return not is_loopback(self.bind_host)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Sessions:
    """Session ids handed out for the API key (kept in memory: a restart logs the page out)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def new(self) -> str:
        sid = secrets.token_urlsafe(32)
        self.ids.add(sid)
        return sid

    def valid(self, sid: str | None) -> bool:
        return bool(sid) and any(hmac.compare_digest(sid, s) for s in self.ids)


def _limit_for(path: str) -> int:
    if path.startswith(WEBHOOK_PREFIX):
        return LIMITS["webhook"]
    if path == "/api/cloud/datasets":
        return LIMITS["upload"]
    return LIMITS["default"]


def _cookie(headers: dict[str, str], name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


class SecurityMiddleware:
    def __init__(self, app, policy: Callable[[], Policy], sessions: Sessions):
        self.app = app
        self.policy = policy
        self.sessions = sessions

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        policy = self.policy()

        async def send_secure(message):
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if path.startswith("/api/"):
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        problem = self.check(policy, headers, path, method)
        if problem is not None:
            status, detail = problem
            return await _json(send_secure, status, {"detail": detail})

        limit = _limit_for(path)
        length = headers.get("content-length")
        if length is not None and length.isdigit():
            if int(length) > limit:
                return await _json(
                    send_secure, 413, {"detail": f"request body over the {limit // MiB} MiB limit"}
                )
            return await self.app(scope, receive, send_secure)
        # No Content-Length (chunked): read the body here, within the limit, then hand it on.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await _json(
                    send_secure, 413, {"detail": f"request body over the {limit // MiB} MiB limit"}
                )
            if not message.get("more_body"):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        await self.app(scope, replay_receive, send_secure)

    def check(
        self, policy: Policy, headers: dict[str, str], path: str, method: str
    ) -> tuple[int, str] | None:
        host, _ = _split_host(headers.get("host", ""))
        if host not in policy.allowed_hosts():
            return 421, "Host not allowed (this server answers only to its own names)"
        webhook = path.startswith(WEBHOOK_PREFIX)
        if method in STATE_CHANGING and not webhook:
            origin = headers.get("origin")
            site = headers.get("sec-fetch-site")
            if origin is not None and origin.lower() not in policy.allowed_origins():
                return 403, "cross-site request refused"
            if site in ("cross-site", "same-site"):
                return 403, "cross-site request refused"
        public = method in ("GET", "HEAD") and (path == "/" or path.startswith("/static/"))  # the login form
        if policy.needs_auth and not webhook and not public and path != "/api/session":
            if not self.authenticated(policy, headers):
                return (
                    401,
                    "authentication required: send the API key (Authorization: Bearer <key>) or log in",
                )
        return None

    def authenticated(self, policy: Policy, headers: dict[str, str]) -> bool:
        if policy.api_key_hash is None:
            return False
        key = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if key and hmac.compare_digest(hash_key(key), policy.api_key_hash):
            return True
        return self.sessions.valid(_cookie(headers, SESSION_COOKIE))


async def _json(send: Callable[[dict], Awaitable[None]], status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})
