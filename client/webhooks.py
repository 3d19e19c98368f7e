"""The webhook receiver's security checks, framework-free.

Everything here takes plain values (the peer address, a header mapping, the raw body bytes) so
that any HTTP server can call it. Order of checks for one request (``authenticate`` runs them):

1. the client address (``client_ip``; ``X-Forwarded-For`` only through trusted proxies) must be
   in the allow-list (``ip_allowed``)                                  -> 403
2. the body must not exceed ``MAX_WEBHOOK_BODY`` (check ``Content-Length`` before reading with
   ``check_content_length``, and the bytes read with ``check_body_size``) -> 413
3. the Standard Webhooks signature (``WebhookVerifier.verify``)         -> 400 / 401 / 500 / 503
4. the signed body must be a JSON object (``parse_payload``)            -> 400

Replays: a captured request is only accepted within ``tolerance_s`` of its signed timestamp,
and inside that window the job store's ``seen_webhook(webhook-id)`` drops duplicates (Replicate
reuses the id when it retries the ``completed`` event).

Signature checking uses the official ``replicate.webhook.Webhooks.validate`` of replicate 1.0.7
(Replicate's documented verifier, and the client already depends on ``replicate``). Its quirks
are neutralised before it is called: the timestamp is checked here (with an injectable clock,
and a non-integer timestamp is a 400 rather than a stray ``ValueError``), the body is decoded
to ``str`` here (1.0.7 would sign ``"b'...'"`` for bytes), the secret is normalised and checked
here, and only well-formed ``v1,<base64 of 32 bytes>`` entries of ``webhook-signature`` are
passed on (1.0.7 raises a raw ``binascii.Error`` on a malformed entry even when a later entry
is valid, and it does not check the ``v1`` label).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from replicate.webhook import (
    InvalidSecretKeyError,
    Webhooks,
    WebhookSigningSecret,
    WebhookValidationError,
)

__all__ = [
    "REPLICATE_WEBHOOK_CIDRS",
    "MAX_WEBHOOK_BODY",
    "DEFAULT_TOLERANCE_S",
    "WebhookRejected",
    "WebhookVerifier",
    "client_ip",
    "ip_allowed",
    "parse_networks",
    "check_content_length",
    "check_body_size",
    "authenticate",
    "parse_payload",
]

# Source addresses Replicate sends webhooks from (the default allow-list).
REPLICATE_WEBHOOK_CIDRS: tuple[str, ...] = ("34.82.0.0/16", "35.185.0.0/16")

# Replicate posts the whole prediction/training object, and ``logs`` is the *cumulative* log
# text: a training that prints one PROGRESS line (~130 bytes) per step reaches 1 MiB after about
# 8,000 logged steps, before counting the cache/validation lines and the input/output JSON.
# 8 MiB leaves headroom for ~60,000 logged steps while still bounding what one request may make
# the receiver buffer before the HMAC check (only after the IP allow-list has passed). A body
# over the cap gets a 413; Replicate retries only the ``completed`` event and then gives up, so
# the poller (``JobStore.unfinished``) is what still finishes such a job.
MAX_WEBHOOK_BODY = 8 * 1024 * 1024

# Standard Webhooks' recommended tolerance (Replicate documents none).
DEFAULT_TOLERANCE_S = 300

_HEADER_ID = "webhook-id"
_HEADER_TS = "webhook-timestamp"
_HEADER_SIG = "webhook-signature"
_SECRET_PREFIX = "whsec_"
_TS_RE = re.compile(r"^[0-9]{1,12}$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


class WebhookRejected(Exception):
    """A webhook request to refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


# --------------------------------------------------------------------------- addresses

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_ip(value: str | None) -> _Address | None:
    """An address from a peer/XFF value (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``,
    ``fe80::1%eth0``); IPv4-mapped IPv6 becomes IPv4. None when malformed."""
    if not isinstance(value, str):
        return None
    s = value.strip().strip('"')
    if not s or len(s) > 64:
        return None
    if s.startswith("["):  # [v6] or [v6]:port
        end = s.find("]")
        if end < 0 or (s[end + 1 :] and not re.fullmatch(r":[0-9]{1,5}", s[end + 1 :])):
            return None
        s = s[1:end]
    elif s.count(":") == 1:  # v4:port
        host, port = s.split(":")
        if not port.isdigit():
            return None
        s = host
    s = s.split("%", 1)[0]  # drop an IPv6 zone id
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_networks(entries: Iterable[str]) -> tuple[_Network, ...]:
    """CIDRs or single addresses (IPv4/IPv6) as networks; raises ValueError on a bad entry.

    Call it when loading settings so a typo fails at start-up, not per request.
    """
    if isinstance(entries, str):
        raise ValueError("expected a list of CIDRs or addresses, not a single string")
    nets = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"not an address or CIDR: {entry!r}")
        text = entry.strip()
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"not an address or CIDR: {entry!r}") from None
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
            mapped = net.network_address.ipv4_mapped
            if mapped is not None:  # ::ffff:a.b.c.d/120 -> a.b.c.d/24
                net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}", strict=False)
        nets.append(net)
    return tuple(nets)


def _in_any(addr: _Address, nets: Sequence[_Network]) -> bool:
    return any(addr.version == net.version and addr in net for net in nets)


def ip_allowed(ip: str, allowed: Sequence[str]) -> bool:
    """Whether ``ip`` lies in one of ``allowed`` (CIDRs or single addresses, IPv4 and IPv6).

    An empty list allows nothing: allowing everyone must be explicit (``["0.0.0.0/0", "::/0"]``).
    The usual configured value is ``REPLICATE_WEBHOOK_CIDRS``. A malformed ``ip`` is refused; a
    malformed entry in ``allowed`` raises ValueError (validate settings with ``parse_networks``).
    """
    addr = _parse_ip(ip)
    if addr is None:
        return False
    return _in_any(addr, parse_networks(allowed))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header value, matching the name case-insensitively."""
    value = headers.get(name)
    if value is None:
        lname = name.lower()
        for key, val in headers.items():
            if isinstance(key, str) and key.lower() == lname:
                value = val
                break
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value if isinstance(value, str) else None


def client_ip(peer: str, headers: Mapping[str, str], trusted_proxies: Sequence[str]) -> str:
    """The address of the client that made the request.

    ``X-Forwarded-For`` counts only when the TCP peer is a trusted proxy (CIDRs or addresses).
    The chain is walked from the right (the entry the nearest proxy appended) skipping trusted
    proxies; the first untrusted address is the client. Anything left of it was written by the
    client itself and is never believed. A malformed entry (``unknown``, garbage) stops the walk:
    the answer is then the nearest hop that can be vouched for (a trusted proxy's address, which
    an allow-list of Replicate's ranges refuses). Returns "" when the peer itself is malformed.
    """
    peer_addr = _parse_ip(peer)
    if peer_addr is None:
        return ""
    trusted = parse_networks(trusted_proxies)
    if not trusted or not _in_any(peer_addr, trusted):
        return str(peer_addr)
    xff = _header(headers, "x-forwarded-for")
    if not xff:
        return str(peer_addr)
    current = peer_addr
    for entry in reversed(xff.split(",")):
        addr = _parse_ip(entry)
        if addr is None:
            return str(current)  # malformed: stop, trust nothing further left
        if not _in_any(addr, trusted):
            return str(addr)
        current = addr
    return str(current)  # every hop is a trusted proxy


# --------------------------------------------------------------------------- body size


def check_content_length(headers: Mapping[str, str], limit: int = MAX_WEBHOOK_BODY) -> None:
    """Refuse before reading: 413 when ``Content-Length`` exceeds ``limit``, 400 when malformed.
    A missing Content-Length (chunked) is allowed; bound the read with ``limit + 1`` bytes and
    call ``check_body_size`` on what was read."""
    value = _header(headers, "content-length")
    if value is None:
        return
    value = value.strip()
    if not value.isdigit():
        raise WebhookRejected(400, "malformed Content-Length")
    if int(value) > limit:
        raise WebhookRejected(413, f"body larger than {limit} bytes")


def check_body_size(body: bytes, limit: int = MAX_WEBHOOK_BODY) -> None:
    if len(body) > limit:
        raise WebhookRejected(413, f"body larger than {limit} bytes")


# --------------------------------------------------------------------------- signatures


def _normalise_secret(secret: object) -> WebhookSigningSecret:
    """``whsec_<base64>`` (the prefix is optional) as the 1.0.7 secret object, or raise
    InvalidSecretKeyError. 1.0.7 itself would accept any ``x_y`` and decode ``y`` leniently."""
    if not isinstance(secret, str):
        raise InvalidSecretKeyError("webhook secret is not a string")
    raw = secret.strip()
    if raw.startswith(_SECRET_PREFIX):
        raw = raw[len(_SECRET_PREFIX) :]
    if not raw or "_" in raw or not _B64_RE.match(raw):
        raise InvalidSecretKeyError("webhook secret is not whsec_<base64>")
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecretKeyError("webhook secret is not whsec_<base64>") from None
    if len(key) < 16:
        raise InvalidSecretKeyError("webhook secret is too short")
    return WebhookSigningSecret(key=_SECRET_PREFIX + raw)


def _well_formed_signatures(header: str) -> list[str]:
    """The ``v1,<base64 of a 32-byte HMAC>`` entries of a ``webhook-signature`` header."""
    keep = []
    for entry in header.split():
        version, sep, sig = entry.partition(",")
        if version != "v1" or not sep or len(sig) != 44 or not _B64_RE.match(sig):
            continue
        try:
            if len(base64.b64decode(sig, validate=True)) != 32:
                continue
        except (binascii.Error, ValueError):
            continue
        keep.append(f"v1,{sig}")
    return keep


class WebhookVerifier:
    """Checks Replicate's Standard Webhooks signature on a raw request.

    ``get_secret(refresh)`` returns the account's signing secret (``whsec_...``, from
    ``client.webhooks.default.secret().key`` or settings). The verifier caches it; when a
    signature does not match (or the cached secret is unusable) it calls ``get_secret(True)``
    once, since the account secret may have been rotated, and checks again before refusing.
    Refreshes are spaced at least ``min_refresh_interval_s`` apart so that a flood of forged
    requests cannot turn into a flood of secret fetches. Thread-safe.
    """

    def __init__(
        self,
        get_secret: Callable[[bool], str],
        tolerance_s: int = DEFAULT_TOLERANCE_S,
        now: Callable[[], float] = time.time,
        *,
        min_refresh_interval_s: float = 30.0,
    ):
        if tolerance_s is None or tolerance_s < 0:
            raise ValueError("tolerance_s must be a non-negative number of seconds")
        self._get_secret = get_secret
        self.tolerance_s = int(tolerance_s)
        self._now = now
        self.min_refresh_interval_s = float(min_refresh_interval_s)
        self._lock = threading.Lock()
        self._secret: str | None = None
        self._last_refresh: float | None = None

    # -- secret cache
    def _fetch(self, refresh: bool) -> str:
        try:
            secret = self._get_secret(refresh)
        except Exception as e:  # the secret endpoint or settings are unavailable
            raise WebhookRejected(503, f"webhook signing secret unavailable: {type(e).__name__}") from e
        if not isinstance(secret, str) or not secret:
            raise WebhookRejected(500, "webhook signing secret is empty")
        return secret

    def _cached_secret(self) -> str:
        with self._lock:
            if self._secret is None:
                self._secret = self._fetch(False)
            return self._secret

    def _refreshed_secret(self, stale: str) -> str | None:
        """A fresh secret when it differs from ``stale`` and refreshing is allowed now."""
        with self._lock:
            if self._secret is not None and self._secret != stale:
                return self._secret  # another thread refreshed meanwhile
            now = self._now()
            if self._last_refresh is not None and now - self._last_refresh < self.min_refresh_interval_s:
                return None
            self._last_refresh = now
            fresh = self._fetch(True)
            self._secret = fresh
            return fresh if fresh != stale else None

    # -- checks
    def _headers(self, headers: Mapping[str, str]) -> tuple[str, str, str]:
        values = {n: (_header(headers, n) or "").strip() for n in (_HEADER_ID, _HEADER_TS, _HEADER_SIG)}
        missing = [n for n, v in values.items() if not v]
        if missing:
            raise WebhookRejected(400, "missing header(s): " + ", ".join(missing))
        wid, ts, sig = values[_HEADER_ID], values[_HEADER_TS], values[_HEADER_SIG]
        if len(wid) > 256 or not wid.isprintable():
            raise WebhookRejected(400, "malformed webhook-id")
        if not _TS_RE.match(ts):
            raise WebhookRejected(400, "malformed webhook-timestamp")
        return wid, ts, sig

    def _check_timestamp(self, ts: str) -> None:
        skew = self._now() - int(ts)
        if skew > self.tolerance_s:
            raise WebhookRejected(401, f"webhook timestamp too old ({int(skew)} s > {self.tolerance_s} s)")
        if -skew > self.tolerance_s:
            raise WebhookRejected(
                401, f"webhook timestamp in the future ({int(-skew)} s > {self.tolerance_s} s)"
            )

    @staticmethod
    def _matches(secret: str, wid: str, ts: str, sigs: str, body: str) -> bool:
        """True on a match, False on a mismatch; raises InvalidSecretKeyError for a bad secret."""
        secret_obj = _normalise_secret(secret)
        try:
            Webhooks.validate(
                headers={_HEADER_ID: wid, _HEADER_TS: ts, _HEADER_SIG: sigs},
                body=body,
                secret=secret_obj,
                tolerance=None,
            )
        except InvalidSecretKeyError:
            raise
        except (WebhookValidationError, binascii.Error, ValueError):
            return False
        return True

    def verify(self, headers: Mapping[str, str], body: bytes) -> str:
        """Accept or raise ``WebhookRejected``; returns the ``webhook-id`` (for dedupe)."""
        wid, ts, sig_header = self._headers(headers)
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise TypeError("body must be the raw request bytes")
        body = bytes(body)
        check_body_size(body)
        if not body:
            raise WebhookRejected(400, "empty body")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise WebhookRejected(400, "body is not UTF-8") from None
        self._check_timestamp(ts)
        sigs = _well_formed_signatures(sig_header)
        if not sigs:
            raise WebhookRejected(401, "no well-formed v1 signature")
        sigs_joined = " ".join(sigs)

        secret = self._cached_secret()
        bad_secret = False
        try:
            if self._matches(secret, wid, ts, sigs_joined, text):
                return wid
        except InvalidSecretKeyError:
            bad_secret = True
        fresh = self._refreshed_secret(secret)  # rotated on the account?
        if fresh is not None:
            try:
                if self._matches(fresh, wid, ts, sigs_joined, text):
                    return wid
                bad_secret = False
            except InvalidSecretKeyError:
                bad_secret = True
        if bad_secret:
            raise WebhookRejected(500, "the configured webhook signing secret is invalid")
        raise WebhookRejected(401, "invalid webhook signature")


def authenticate(
    peer: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    verifier: WebhookVerifier,
    allowed: Sequence[str] = REPLICATE_WEBHOOK_CIDRS,
    trusted_proxies: Sequence[str] = (),
) -> str:
    """All checks for one request, in order (address, size, signature). Returns the webhook id;
    raises ``WebhookRejected``. The caller then dedupes with ``JobStore.seen_webhook``."""
    ip = client_ip(peer, headers, trusted_proxies)
    if not ip or not ip_allowed(ip, allowed):
        raise WebhookRejected(403, f"address not allowed: {ip or peer!r}")
    check_content_length(headers)
    check_body_size(body)
    return verifier.verify(headers, body)


def parse_payload(body: bytes) -> dict[str, Any]:
    """The job object a webhook carries. A body that is not a JSON object is refused with a 400
    (the sender's mistake, not ours: a 5xx would only make it send the same body again)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WebhookRejected(400, "body is not JSON (expected the prediction or training object)") from None
    if not isinstance(payload, dict):
        raise WebhookRejected(
            400, f"body is JSON {type(payload).__name__}, expected an object (the prediction or training)"
        )
    return payload
