"""One HTTP library (httpx) and one retry policy for every download the project makes (torch-free).

- ``RetryPolicy``: how many attempts, exponential backoff with jitter, ``Retry-After`` honoured; it
  wraps any callable (``policy.call(fn)`` or ``@policy``). What is worth another try is decided by
  ``is_retryable``: connection errors, timeouts, a connection cut mid-body, HTTP 408 / 429 / 5xx.
- ``download(url, dest)``: a streaming GET into ``dest.part``, renamed to ``dest`` only when complete,
  so nothing half-written ever sits under the final name. A retry (or a later call) resumes the
  partial file with a ``Range`` request when the server allows it.
- ``DownloadError``: the one error ``download`` raises; its message names the URL (without
  credentials or query string: signed URLs carry secrets there) and the HTTP status.

The trainer (base weights, trained weights) and the client (job outputs, images) both use it.
"""

from __future__ import annotations

import email.utils
import functools
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

__all__ = [
    "DownloadError",
    "RetryPolicy",
    "download",
    "is_retryable",
    "is_transport_error",
    "retry_after",
    "retryable_status",
    "safe_url",
]

T = TypeVar("T")
USER_AGENT = "advanced-trainer/1"


def safe_url(url: str) -> str:
    """``url`` for messages and logs: no user:password, no query string (``?…`` marks one), no fragment."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:  # e.g. an unclosed "[" in the host: show the scheme only, it may hold anything
        return url.split("://", 1)[0] + "://…"
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", "")) + ("?…" if parts.query else "")


class DownloadError(Exception):
    """A download failed. ``url`` is the safe form, ``status`` the HTTP status when there was one."""

    def __init__(
        self,
        url: str,
        detail: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ):
        self.url = safe_url(url)
        self.detail = detail.replace(url, self.url)  # an exception text may quote the signed URL
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        super().__init__(f"download of {self.url} failed: {self.detail}")


# ------------------------------------------------------------------------------------ what to retry


def retryable_status(status: int) -> bool:
    """Request timeout, rate limiting and server errors may pass; every other status will not."""
    return status in (408, 429) or 500 <= status <= 599


def _mro_names(exc: BaseException, root: str) -> set[str]:
    """Class names in ``exc``'s hierarchy that come from a package named ``root*`` (httpx, httpx2)."""
    return {c.__name__ for c in type(exc).__mro__ if c.__module__.split(".")[0].startswith(root)}


def is_transport_error(exc: BaseException) -> bool:
    """The network failed (refused, reset, DNS, TLS, timeout, cut mid-body): no HTTP answer came back.

    huggingface_hub 2.x raises from its own fork of httpx (``httpx2``), whose classes are not
    httpx's; they are recognised by name in the class hierarchy, so this module needs neither an
    undeclared package nor the Hub client to classify them.
    """
    if isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError)):
        return True
    return "TransportError" in _mro_names(exc, "httpx")


def _status_of(exc: BaseException) -> int | None:
    if isinstance(exc, DownloadError):
        return exc.status
    status = getattr(getattr(exc, "response", None), "status_code", None)  # httpx / httpx2 / Hub errors
    return status if isinstance(status, int) else None


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt might succeed (see the module docstring)."""
    if isinstance(exc, DownloadError):
        return exc.retryable
    status = _status_of(exc)
    if status is not None:
        return retryable_status(status)
    # a URL that is not http(s) fails the same way every time, though httpx files it under transport
    return is_transport_error(exc) and "UnsupportedProtocol" not in _mro_names(exc, "httpx")


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After``: delta-seconds or an HTTP date (RFC 9110 10.2.3); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (its ``Retry-After`` header), if it said."""
    if isinstance(exc, DownloadError):
        return exc.retry_after_s
    headers = getattr(getattr(exc, "response", None), "headers", None)
    return _parse_retry_after(headers.get("retry-after")) if headers is not None else None


# ------------------------------------------------------------------------------------ the policy


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; before try n+1 wait ``base_delay_s * 2**(n-1)`` (at most ``max_delay_s``)
    with "equal jitter" (half of it fixed, half random) so that clients that failed together do not
    come back together, or the server's ``Retry-After`` (at most ``max_retry_after_s``) when it sent one.
    ``sleep`` is injectable so that tests do not wait."""

    attempts: int = 4
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    max_retry_after_s: float = 120.0
    retryable: Callable[[BaseException], bool] = is_retryable
    sleep: Callable[[float], Any] = time.sleep
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        asked = retry_after(exc)
        if asked is not None:
            return min(asked, self.max_retry_after_s)
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return cap / 2 + self.rng.uniform(0, cap / 2)

    def call(
        self, fn: Callable[[], T], on_retry: Callable[[int, BaseException, float], Any] | None = None
    ) -> T:
        """``fn()``, tried again after a retryable failure; the last failure propagates unchanged.

        ``on_retry(attempt, exc, wait_s)`` is called before each wait (e.g. to log it)."""
        assert self.attempts >= 1
        for attempt in range(1, self.attempts):
            try:
                return fn()
            except Exception as exc:
                if not self.retryable(exc):
                    raise
                wait = self.delay(attempt, exc)
                if on_retry is not None:
                    on_retry(attempt, exc, wait)
                self.sleep(wait)
        return fn()  # the last attempt: whatever it raises is the answer

    def __call__(self, fn: Callable[..., T]) -> Callable[..., T]:
        """As a decorator: every call of ``fn`` is retried under this policy."""

        @functools.wraps(fn)
        def retried(*args: Any, **kwargs: Any) -> T:
            return self.call(lambda: fn(*args, **kwargs))

        return retried


DEFAULT_RETRY = RetryPolicy()


# ------------------------------------------------------------------------------------ downloading


def _status_error(url: str, response: httpx.Response) -> DownloadError:
    status = response.status_code
    return DownloadError(
        url,
        f"HTTP {status} {response.reason_phrase}".rstrip(),
        status=status,
        retryable=retryable_status(status),
        retry_after_s=_parse_retry_after(response.headers.get("retry-after")),
    )


@dataclass
class _Transfer:
    """One download's state across attempts: the partial file and what identifies the remote version."""

    url: str
    part: Path
    headers: Mapping[str, str]
    timeout: float
    max_bytes: int | None
    progress: Callable[[int, int | None], Any] | None
    validator: str | None = None  # ETag or Last-Modified of the first answer: a resume must match it

    def request_headers(self, have: int) -> dict[str, str]:
        out = {"User-Agent": USER_AGENT, **self.headers}
        if have:
            out["Range"] = f"bytes={have}-"
            if self.validator:  # the file changed upstream? then the server sends all of it (200)
                out["If-Range"] = self.validator
        return out

    def attempt(self) -> None:
        have = self.part.stat().st_size if self.part.exists() else 0
        with httpx.stream(
            "GET", self.url, headers=self.request_headers(have), timeout=self.timeout, follow_redirects=True
        ) as r:
            if r.status_code == 416 and have:
                self._check_complete(r, have)
                return
            if r.status_code not in (200, 206):
                raise _status_error(self.url, r)
            self.validator = self.validator or r.headers.get("etag") or r.headers.get("last-modified")
            if r.status_code == 200:
                have = 0  # the server ignored the range (or the file changed): start over
            length = r.headers.get("content-length")
            total = int(length) + have if length and length.isdigit() else None
            self._check_size(total)
            self._write(r, have, total)

    def _check_complete(self, r: httpx.Response, have: int) -> None:
        """416 to ``Range: bytes=have-``: nothing past ``have``; complete only if the sizes agree."""
        size = r.headers.get("content-range", "").rpartition("/")[2]
        if size.isdigit() and int(size) != have:
            self.part.unlink()
            raise DownloadError(
                self.url,
                f"the partial file ({have} bytes) does not match the remote one "
                f"({size} bytes); starting over",
                retryable=True,
            )

    def _check_size(self, total: int | None) -> None:
        if self.max_bytes is not None and total is not None and total > self.max_bytes:
            raise DownloadError(self.url, f"it is {total} bytes, more than the {self.max_bytes} allowed")

    def _write(self, r: httpx.Response, have: int, total: int | None) -> None:
        if self.progress:
            self.progress(have, total)
        with open(self.part, "ab" if have else "wb") as f:
            for chunk in r.iter_bytes():  # as the bytes arrive: a cut keeps all that came before it
                f.write(chunk)
                have += len(chunk)
                if self.max_bytes is not None and have > self.max_bytes:
                    raise DownloadError(self.url, f"more than the {self.max_bytes} bytes allowed")
                if self.progress:
                    self.progress(have, total)
        if total is not None and have < total:
            raise DownloadError(
                self.url, f"the connection ended after {have} of {total} bytes", retryable=True
            )


def download(
    url: str,
    dest: Path,
    *,
    progress: Callable[[int, int | None], Any] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    max_bytes: int | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> Path:
    """Stream the http(s) ``url`` into ``dest`` and return ``dest``; retried under ``retry``.

    Bytes go to ``dest.part`` first and are renamed to ``dest`` once complete. A failed download
    leaves ``dest.part`` behind, which the next call for the same ``dest`` resumes. ``progress(done,
    total)`` is called when the answer arrives (``done`` bytes already there; ``total`` None when
    the server does not say) and after each chunk; it may raise to stop the download (the exception
    propagates as it is). ``headers`` (e.g. Authorization) are sent with every request and never
    appear in a message. ``max_bytes`` refuses anything larger. A local failure (a full disk) is
    the OSError itself; every other failure is a ``DownloadError`` naming the URL and the HTTP status
    or network error.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    transfer = _Transfer(
        url, dest.with_name(dest.name + ".part"), dict(headers or {}), timeout, max_bytes, progress
    )
    try:
        retry.call(transfer.attempt)
    except DownloadError as exc:
        if exc.retryable and retry.attempts > 1:
            raise DownloadError(
                url, f"{exc.detail} (gave up after {retry.attempts} attempts)", status=exc.status
            ) from None
        raise
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # the network (refused, reset, timeout...), a bad URL
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if is_retryable(exc) and retry.attempts > 1:
            why += f" (gave up after {retry.attempts} attempts)"
        raise DownloadError(url, why) from None
    transfer.part.replace(dest)
    return dest
