"""The Replicate API token: where it comes from, what a good one looks like, whether it works.

Order: ``REPLICATE_API_TOKEN`` in the environment, then the secrets file written by
``advanced-trainer token set`` (mode 0600). The value is never printed, logged, stored in
the job store or sent anywhere but the Replicate API.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import load_secrets, save_secret
from .errors import UserError

ENV = "REPLICATE_API_TOKEN"
SECRET_NAME = "replicate_api_token"
_SHAPE = re.compile(r"^r8_[A-Za-z0-9]{20,80}$")


class TokenError(UserError):
    """A token problem a user can fix; ``kind`` is not_set | malformed | invalid | restart_needed.
    A missing token is a 401 to the server's callers (authenticate first); the rest are 400."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message, 401 if kind == "not_set" else 400)


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # "environment" | "secrets file"

    def __repr__(self) -> str:  # never show the value
        return f"Token(source={self.source!r})"

    __str__ = __repr__


def check_shape(value: str, where: str) -> str:
    """Refuse values that cannot be a Replicate token, saying why (without echoing the value)."""
    if value != value.strip():
        what = "a newline" if "\n" in value or "\r" in value else "spaces"
        raise TokenError(
            "malformed", f"the token in {where} has {what} around it; copy it again without them"
        )
    if not value.startswith("r8_"):
        raise TokenError(
            "malformed",
            f"the token in {where} does not start with r8_; Replicate API tokens do "
            f"(https://replicate.com/account/api-tokens)",
        )
    if not _SHAPE.match(value):
        raise TokenError(
            "malformed", f"the token in {where} is not a complete Replicate token (r8_ and letters/digits)"
        )
    return value


def resolve(root: Path | None = None) -> Token:
    env = os.environ.get(ENV)
    if env is not None and env != "":
        return Token(check_shape(env, f"${ENV}"), "environment")
    saved = load_secrets(root).get(SECRET_NAME)
    if saved:
        return Token(check_shape(saved, "the secrets file"), "secrets file")
    raise TokenError("not_set", f"no Replicate API token: set {ENV} or run `advanced-trainer token set`")


def status(root: Path | None = None) -> dict:
    """Whether a token is set and where from — never the value."""
    try:
        tok = resolve(root)
        return {"set": True, "source": tok.source}
    except TokenError as exc:
        return {"set": exc.kind != "not_set", "source": None, "problem": str(exc), "kind": exc.kind}


def save(value: str, root: Path | None = None) -> Path:
    check_shape(value, "the value given")
    path = save_secret(SECRET_NAME, value, root)
    env = os.environ.get(ENV)
    if env and env != value:
        raise TokenError(
            "restart_needed",
            f"token saved to {path}, but ${ENV} in this environment overrides it: "
            f"unset {ENV} (or restart your shell / the server) to use the new one",
        )
    return path


def delete(root: Path | None = None) -> bool:
    had = SECRET_NAME in load_secrets(root)
    save_secret(SECRET_NAME, None, root)
    return had
