"""train/redaction.py: the one marker and the token shapes that hide secrets in logs, errors and the job store."""

from __future__ import annotations

import pytest

from train.redaction import REDACTED, TOKEN_RE, Redactor, redact

SHAPED = [
    "r8_" + "A1b2C3d4E5f6G7h8I9j0K",
    "hf_" + "abcdefghijklmnopqrstu",
    "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "AKIA" + "IOSFODNN7EXAMPLE",
    "sk-" + "proj-abcdefghijklmnopqrstuvwx",
    "ghp_" + "abcdefghijklmnopqrstuvwxyz0123",
    "xoxb-" + "1234567890-abcdef",
    "-----BEGIN RSA PRIVATE KEY-----",
]


@pytest.mark.parametrize("token", SHAPED)
def test_token_shapes_are_hidden_without_being_told(token):
    out = redact(f"error: auth failed for {token}; retrying")
    assert token not in out and out == f"error: auth failed for {REDACTED}; retrying"


def test_given_values_are_hidden_longest_first():
    secrets = ["pass", "pass-phrase-2024", None, ""]
    out = Redactor(secrets)("login with pass-phrase-2024, then pass")
    assert out == f"login with {REDACTED}, then {REDACTED}"  # no "-phrase-2024" tail left behind


def test_ordinary_text_is_left_alone():
    text = "the branch_hf_export step wrote 3 files; a 3-char value like 'abc' is not hidden"
    assert Redactor(["abc"])(text) == text  # too short to be a secret, and hf_ inside a word is not a token
    assert TOKEN_RE.search("pathf_abcdefghijklmnopqrstu") is None  # "hf_" inside an identifier
    assert TOKEN_RE.search("HF_TOKEN=hf_abcdefghijklmnopqrstu") is not None


def test_one_marker_everywhere():
    assert (
        redact("hf_abcdefghijklmnopqrstu") == redact("given-secret-value", ["given-secret-value"]) == REDACTED
    )
