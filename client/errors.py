"""The errors the client raises, and what each means to the CLI (exit code) and the server (HTTP status).

Two kinds, decided in one place so the CLI and the server never disagree:

- a problem the user can fix (bad spec, dataset too large, token missing, spend limit, or a remote
  refusal such as 401 bad token, 402 no billing, 404 unknown model): CLI exit 2, HTTP 4xx;
- a remote failure (network down, 429 throttled, 5xx): CLI exit 3, HTTP 502 — trying again may work.

A job that ran and failed is neither: the CLI exits 1 for it (``EXIT_JOB_FAILED``).
"""

from __future__ import annotations

from train.http import retryable_status

EXIT_OK, EXIT_JOB_FAILED, EXIT_USER, EXIT_REMOTE = 0, 1, 2, 3

# Remote HTTP statuses a user can do something about (token, billing, names, sizes, inputs). The
# ones where waiting and trying again is the remedy (408, 429, 5xx) are train.http's rule, the same
# for every request the project makes.
USER_FIXABLE_STATUSES = frozenset({401, 402, 403, 404, 413, 422})


class ClientError(Exception):
    """Base of every error the client raises on purpose."""


class UserError(ClientError):
    """Something the user can fix; ``status`` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


class ProviderError(ClientError):
    """A remote failure (network, API error); ``status`` is the remote HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class RemoteUserError(ProviderError):
    """The remote side refused the request for a reason the user can fix (``USER_FIXABLE_STATUSES``)."""


def is_retryable(status: int | None) -> bool:
    """Whether a remote answer (None: no answer at all) is worth trying again."""
    return status is None or retryable_status(status)


def remote_error(message: str, status: int | None, retry_after: float | None = None) -> ProviderError:
    """The error for a remote answer with ``status``: user-fixable or not, by the one table."""
    cls = RemoteUserError if status in USER_FIXABLE_STATUSES else ProviderError
    return cls(message, status, retry_after)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, (UserError, RemoteUserError)) or (
        isinstance(exc, ProviderError) and exc.status in USER_FIXABLE_STATUSES
    )


def exit_code(exc: ClientError) -> int:
    """The CLI's exit code for ``exc``."""
    return EXIT_USER if is_user_error(exc) else EXIT_REMOTE


def http_status(exc: ClientError) -> int:
    """The status the server answers with for ``exc``: a remote refusal keeps its own status (a 402
    stays a 402, so the page can say "billing"); a remote failure is a bad gateway."""
    if isinstance(exc, UserError):
        return exc.status
    if isinstance(exc, ProviderError) and is_user_error(exc):
        return exc.status if exc.status in USER_FIXABLE_STATUSES else 400
    return 502
