"""What a secret looks like, and the one marker that replaces it (torch-free; the client imports it).

Three places hide secrets: the trainer's log relay (values the job was given, e.g. HF_TOKEN), publish
errors (a token echoed in an S3/Hub message) and the client's job store (inputs and responses it
keeps). They share the token shapes and the marker so a redacted value reads the same everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "**********"

# Credentials by shape: Replicate, Hugging Face, webhook signing secrets, AWS key ids, OpenAI-style
# keys, GitHub and Slack tokens, PEM private keys. Bounded by a non-alphanumeric on the left so an
# ordinary word that happens to contain "hf_" is left alone.
TOKEN_RE = re.compile(
    r"(?<![A-Za-z0-9])(?:r8_[A-Za-z0-9]{20,}|hf_[A-Za-z0-9]{16,}|whsec_[A-Za-z0-9+/=]{16,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abpr]-[A-Za-z0-9-]{10,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----)"
)

# Shorter "secrets" would only mangle ordinary words in the text they are removed from.
MIN_SECRET_LEN = 4


class Redactor:
    """Replaces the given secret values (longest first) and anything shaped like a token."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        values = {s for s in secrets if s and len(s) >= MIN_SECRET_LEN}
        self.values = sorted(values, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, REDACTED)
        return TOKEN_RE.sub(REDACTED, text)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    return Redactor(secrets)(text)
