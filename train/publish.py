"""Publishing a finished output folder: the Hugging Face Hub and S3-compatible object storage.

    publish(folder, spec.publish, hf_token=..., s3_access_key_id=..., s3_secret_access_key=...)

runs the targets the spec's ``publish`` section configures (the Hub when ``hub_model_id`` is
set, S3 when ``s3_bucket`` is set) and returns ``{"hub": url, "s3": [urls]}``. Credentials are
arguments, never spec fields; they never appear in an error message. Every failure is a
:class:`PublishError` that says which target failed, why, and what to change.

S3 works with AWS and with S3-compatible stores (MinIO, Backblaze B2, Cloudflare R2) through
``s3_endpoint_url`` + ``s3_region``: a custom endpoint gets path-style addressing, SigV4 and
checksums only where the API requires them (third-party stores reject boto's default CRC headers).

This module does not import torch; boto3 and huggingface_hub are imported when a target runs.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .http import is_transport_error
from .redaction import redact
from .weights import point_modular_index

__all__ = [
    "PublishError",
    "check_hub",
    "check_s3",
    "check_targets",
    "content_type",
    "full_fine_tune_target_problem",
    "list_files",
    "publish",
    "publish_hub",
    "publish_s3",
]

SKIP_DIRS = frozenset({".work"})  # scratch space of a job (caches, staging): never published
HUB_IGNORE_PATTERNS = [".work", ".work/*", "*/.work/*"]
COMMIT_MESSAGE = "Upload training output from advanced-trainer"

# boto3 managed transfer: files above the threshold go up as concurrent multipart uploads.
# 64 MiB parts allow objects up to 640 GiB (10,000 parts) and suit B2/R2's 5 MiB minimum.
MULTIPART_THRESHOLD = 64 * 2**20
MULTIPART_CHUNKSIZE = 64 * 2**20
MAX_CONCURRENCY = 8
S3_MAX_ATTEMPTS = 5  # per request, first try included ("standard" mode: throttling, 5xx, connection errors)
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 120

_CONTENT_TYPES = {
    ".safetensors": "application/octet-stream",
    ".bin": "application/octet-stream",
    ".pt": "application/octet-stream",
    ".ckpt": "application/octet-stream",
    ".json": "application/json",
    ".md": "text/markdown",
    ".txt": "text/plain",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
}


class PublishError(RuntimeError):
    """Publishing to one target failed; the message names the target, the cause and the fix."""


# Cog hands a training's output to the platform as one file, read into memory and uploaded with a
# 25-second timeout (coglet's orchestrator, ``upload_file``): a full fine-tune (SDXL's UNet ~5 GB,
# FLUX.1-dev's transformer ~24 GB) cannot travel that way, so on the Cog train entry it goes to a
# publish target and output.zip carries a pointer to it (train/published.py).
def full_fine_tune_target_problem(spec: Any) -> str | None:
    """Why ``spec`` cannot run on the Cog train entry as it is (a full fine-tune without a publish
    target), or None. The local trainer CLI writes the model into its output folder instead."""
    if spec.mode != "full" or spec.publish.hub_model_id or spec.publish.s3_bucket:
        return None
    return (
        "mode: a full fine-tune needs a publish target: set hub_model_id (with hf_token) or s3_bucket "
        "(with the s3_* inputs). Cog returns a training's output as one file uploaded from memory within "
        "25 seconds, which a multi-GB model cannot make; output.zip then points to the published model "
        "and the trained version loads it from there. (`python -m train` on your own machine writes the "
        "model into its output folder.)"
    )


# ----------------------------------------------------------------------------- helpers


def list_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a POSIX relative path, sorted, without ``.work/`` folders."""
    folder = Path(folder)
    out: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        rel_root = Path(root).relative_to(folder)
        for name in files:
            if os.path.isfile(os.path.join(root, name)):  # skips broken links, sockets, ...
                out.append((rel_root / name).as_posix())
    return sorted(out)


def content_type(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(str(path))
    return guessed or "application/octet-stream"


def _normalise_prefix(prefix: str | None) -> str:
    return "/".join(part for part in (prefix or "").split("/") if part)


def _find_in_chain(exc: BaseException, types: tuple[type, ...]) -> BaseException | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, types):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


# ----------------------------------------------------------------------------- S3

_S3_REFUSED = "the credentials were refused; check s3_access_key_id / s3_secret_access_key"
_S3_HINTS = {
    "InvalidAccessKeyId": _S3_REFUSED,
    "SignatureDoesNotMatch": _S3_REFUSED,
    "InvalidToken": _S3_REFUSED,
    "ExpiredToken": "the credentials have expired; supply fresh s3_access_key_id / s3_secret_access_key",
    "TokenRefreshRequired": "the credentials have expired; supply fresh s3_access_key_id / "
    "s3_secret_access_key",
    "InvalidSecurity": _S3_REFUSED,
    "Unauthorized": _S3_REFUSED,
    "401": _S3_REFUSED,
    "AuthorizationHeaderMalformed": "the request was signed for the wrong region; set s3_region to the "
    "bucket's region",
    "InvalidRegionName": "the region is not valid for this endpoint; check s3_region",
    "PermanentRedirect": "the bucket lives in another region or endpoint; set s3_region (or s3_endpoint_url)",
    "301": "the bucket lives in another region or endpoint; set s3_region (or s3_endpoint_url)",
    "IllegalLocationConstraintException": "the bucket lives in another region; set s3_region",
    "InvalidBucketName": "the bucket name is not valid; check s3_bucket",
    "RequestTimeTooSkewed": "this machine's clock is off; signatures are time-bound; sync the clock",
    "SlowDown": "the store is throttling requests; try again later",
    "ServiceUnavailable": "the store is unavailable; try again later",
    "InternalError": "the store reported an internal error; try again later",
    "EntityTooLarge": "the object is larger than the store accepts",
    "QuotaExceeded": "the account's storage quota is exhausted",
}


def _s3_error_message(exc: BaseException, uri: str, bucket: str, endpoint_url: str | None) -> str:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        CredentialRetrievalError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ReadTimeoutError,
        SSLError,
    )

    where = endpoint_url or "AWS S3"
    client_error = _find_in_chain(exc, (ClientError,))
    if client_error is not None:
        err = client_error.response.get("Error", {})  # type: ignore[attr-defined]
        meta = client_error.response.get("ResponseMetadata", {})  # type: ignore[attr-defined]
        status = meta.get("HTTPStatusCode")
        code = str(err.get("Code") or status or "error")
        server_msg = (err.get("Message") or "").strip()
        if code == "NoSuchBucket" or (code == "404" and "bucket" in server_msg.lower()):
            hint = f"bucket '{bucket}' does not exist at {where}; create it or fix s3_bucket"
        elif code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"):
            hint = (
                f"access to bucket '{bucket}' was denied: the credentials were refused or lack write "
                f"permission (s3:PutObject); check s3_access_key_id / s3_secret_access_key and the "
                f"bucket policy"
            )
        else:
            hint = _S3_HINTS.get(code, "")
        detail = f"{code} ({server_msg})" if server_msg and server_msg != code else code
        return f"S3 upload to {uri} failed: {detail}" + (f" — {hint}" if hint else "")

    no_credentials = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
    if _find_in_chain(exc, no_credentials) is not None:
        return (
            f"S3 upload to {uri} failed: {type(exc).__name__} — no usable S3 credentials: set "
            f"s3_access_key_id / s3_secret_access_key (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        )
    if _find_in_chain(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError)) is not None:
        return (
            f"S3 upload to {uri} failed: {type(exc).__name__} — could not reach {where}; "
            f"check s3_endpoint_url and the network"
        )
    if _find_in_chain(exc, (ReadTimeoutError,)) is not None:
        return f"S3 upload to {uri} failed: ReadTimeoutError — {where} stopped answering; try again"
    if _find_in_chain(exc, (SSLError,)) is not None:
        return (
            f"S3 upload to {uri} failed: SSLError — TLS to {where} failed; check s3_endpoint_url "
            f"(http vs https)"
        )
    if _find_in_chain(exc, (NoRegionError,)) is not None:
        return f"S3 upload to {uri} failed: NoRegionError — set s3_region"
    return f"S3 upload to {uri} failed: {type(exc).__name__}: {exc}"


def _s3_client(
    endpoint_url: str | None, region: str | None, access_key_id: str | None, secret_access_key: str | None
):
    from boto3.session import Session
    from botocore.config import Config

    options: dict[str, Any] = {
        "signature_version": "s3v4",
        "retries": {"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS},
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "read_timeout": S3_READ_TIMEOUT_S,
        "max_pool_connections": max(10, MAX_CONCURRENCY),
    }
    if endpoint_url:
        # MinIO, B2, R2: bucket in the path, and no AWS-only flexible-checksum headers.
        options["s3"] = {"addressing_style": "path"}
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    session = Session(
        aws_access_key_id=access_key_id or None,
        aws_secret_access_key=secret_access_key or None,
        region_name=region or None,
    )
    return session.client("s3", endpoint_url=endpoint_url or None, config=Config(**options))


def publish_s3(
    folder: Path,
    bucket: str,
    prefix: str = "",
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    public_base_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> list[str]:
    """Upload every file under ``folder`` (sorted, ``.work/`` skipped) to ``s3://bucket/prefix/<path>``.

    Returns ``public_base_url/prefix/path`` for each file when ``public_base_url`` is set, else
    ``s3://`` URIs. Credentials: the arguments when given, else boto3's default chain
    (environment, shared config, instance role)."""
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    folder = Path(folder)
    prefix = _normalise_prefix(prefix)
    root_uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    secrets = [access_key_id, secret_access_key]
    if not folder.is_dir():
        raise PublishError(f"S3 upload to {root_uri} failed: {folder} is not a folder")
    if bool(access_key_id) != bool(secret_access_key):
        raise PublishError(
            f"S3 upload to {root_uri} failed: only one of s3_access_key_id / "
            f"s3_secret_access_key "
            f"was given — set both, or neither to use the default AWS credential chain"
        )

    try:
        client = _s3_client(endpoint_url, region, access_key_id, secret_access_key)
    except (BotoCoreError, ClientError, ValueError) as e:
        raise PublishError(redact(_s3_error_message(e, root_uri, bucket, endpoint_url), secrets)) from e
    transfer = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNKSIZE,
        max_concurrency=MAX_CONCURRENCY,
    )
    base = public_base_url.rstrip("/") if public_base_url else None
    urls: list[str] = []
    for rel in list_files(folder):
        key = f"{prefix}/{rel}" if prefix else rel
        uri = f"s3://{bucket}/{key}"
        try:
            client.upload_file(
                str(folder / rel), bucket, key, ExtraArgs={"ContentType": content_type(rel)}, Config=transfer
            )
        except (BotoCoreError, ClientError, Boto3Error) as e:
            raise PublishError(redact(_s3_error_message(e, uri, bucket, endpoint_url), secrets)) from e
        except OSError as e:
            raise PublishError(
                f"S3 upload to {uri} failed: cannot read {folder / rel}: {e.strerror or e}"
            ) from e
        urls.append(f"{base}/{quote(key)}" if base else uri)
    return urls


# ----------------------------------------------------------------------------- Hugging Face Hub


def _hub_error_message(exc: BaseException, repo_id: str, step: str) -> str:
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
    )

    what = {"create": "Hub repo creation", "check": "Hub check", "upload": "Hub upload"}[step]
    what = f"{what} for {repo_id} failed"
    if isinstance(exc, LocalTokenNotFoundError):
        return f"{what}: no Hugging Face token — set hf_token (a token with write access)"
    if isinstance(exc, OfflineModeIsEnabled):
        return f"{what}: HF_HUB_OFFLINE is set — unset it to publish to the Hub"
    if isinstance(exc, HFValidationError):
        return f"{what}: {exc} — check publish.hub_model_id"
    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        server = (exc.server_message or "").strip()
        detail = f"HTTP {status}" + (f" ({server})" if server else "")
        if status == 401:
            hint = "the Hub refused the token; set hf_token to a valid token with write access"
        elif status == 403:
            hint = (
                f"the token may not write to {repo_id}; use a token with write access to that user or "
                f"organisation (hf_token)"
            )
        elif status == 404:
            hint = f"the namespace of {repo_id} was not found; check publish.hub_model_id and hf_token"
        elif status == 400 and "readme" in server.lower():
            hint = "the Hub rejected the model card's metadata (README.md front matter)"
        elif status == 409:
            hint = "the Hub reported a conflict (a concurrent commit?); retry"
        elif status == 429:
            hint = "rate limited by the Hub; try again later"
        elif status is not None and status >= 500:
            hint = "the Hub is having trouble; try again later"
        else:
            hint = ""
        return f"{what}: {detail}" + (f" — {hint}" if hint else "")
    if is_transport_error(exc):  # the Hub client's own httpx fork (httpx2) included, by class name
        return f"{what}: {type(exc).__name__} — could not reach the Hub; check the network (and HF_ENDPOINT)"
    return f"{what}: {type(exc).__name__}: {exc}"


def hub_api(token: str | None) -> Any:
    """The Hub client at ``HF_ENDPOINT`` as it is now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def check_hub(repo_id: str, token: str | None, api: Any = None) -> str:
    """Before any GPU work: ``token`` is a valid Hub token that may write ``repo_id`` (the repo
    exists in a namespace the token's user belongs to, or may be created there). Returns what was
    checked; PublishError naming ``hf_token`` / ``hub_model_id`` otherwise."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if not token:
        raise PublishError(f"hf_token: publishing to {repo_id} needs a Hugging Face token with write access")
    api = api or hub_api(token)
    try:
        me = api.whoami(token=token)
    except Exception as e:  # noqa: BLE001 - the boundary: a refusal, or the Hub unreachable
        raise PublishError(redact(_hub_error_message(e, repo_id, "check"), [token])) from e
    user = me.get("name", "")
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PublishError(
            f"hf_token: the token of {user} is read-only; publishing to {repo_id} needs one with write access"
        )
    namespace = repo_id.split("/")[0]
    orgs = {o.get("name") for o in me.get("orgs") or []}
    if namespace != user and namespace not in orgs:
        raise PublishError(
            f"hub_model_id: {user}'s token cannot write under {namespace!r} (its namespaces: "
            f"{', '.join(sorted({user, *orgs} - {''}))}); fix hub_model_id or hf_token"
        )
    try:
        api.repo_info(repo_id, repo_type="model", token=token)
        return f"hub: {user} may write {repo_id} (it exists)"
    except RepositoryNotFoundError:
        return f"hub: {user} may create {repo_id}"
    except HfHubHTTPError as e:
        raise PublishError(redact(_hub_error_message(e, repo_id, "check"), [token])) from e


def check_s3(
    bucket: str,
    prefix: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> str:
    """Before any GPU work: the credentials may put (and delete) an object under ``prefix`` in
    ``bucket``: a probe object is written and removed. PublishError naming the input otherwise."""
    import uuid

    if bool(access_key_id) != bool(secret_access_key):
        raise PublishError(
            "S3 check failed: only one of s3_access_key_id / s3_secret_access_key was given; set both"
        )
    prefix = _normalise_prefix(prefix)
    key = "/".join(p for p in (prefix, f".advanced-trainer-write-check-{uuid.uuid4().hex[:12]}") if p)
    uri = f"s3://{bucket}/{key}"
    client = _s3_client(endpoint_url, region, access_key_id, secret_access_key)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"advanced-trainer write check\n")
        client.delete_object(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001 - the boundary: every failure becomes a PublishError
        message = _s3_error_message(e, uri, bucket, endpoint_url).replace(
            "S3 upload to", "S3 write check of", 1
        )
        raise PublishError(redact(message, [access_key_id, secret_access_key])) from e
    return f"s3: may write s3://{bucket}/{prefix}"


def check_targets(
    publish_spec: Any,
    *,
    hf_token: str | None = None,
    s3_access_key_id: str | None = None,
    s3_secret_access_key: str | None = None,
) -> list[str]:
    """Every target ``publish_spec`` configures accepts these credentials, checked before any GPU
    work (seconds): the Hub token and namespace, an S3 write under the prefix. Returns what was
    checked; PublishError for the first that fails."""
    done = []
    if publish_spec.hub_model_id:
        done.append(check_hub(publish_spec.hub_model_id, hf_token))
    if publish_spec.s3_bucket:
        done.append(
            check_s3(
                publish_spec.s3_bucket,
                publish_spec.s3_prefix,
                endpoint_url=publish_spec.s3_endpoint_url,
                region=publish_spec.s3_region,
                access_key_id=s3_access_key_id,
                secret_access_key=s3_secret_access_key,
            )
        )
    return done


@dataclass(frozen=True)
class HubUpload:
    url: str  # the repo's page
    revision: str | None  # the commit that holds the upload (pins a published full fine-tune)


def publish_hub(
    folder: Path, repo_id: str, *, private: bool = True, token: str | None = None, api: Any = None
) -> HubUpload:
    """Create (or reuse) the model repo ``repo_id`` and upload ``folder`` to it in one commit.

    The folder's README.md is the model card and goes up as is. ``private`` applies when the
    repo is created; an existing repo keeps its visibility. Returns the repo URL and the commit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"Hub upload for {repo_id} failed: {folder} is not a folder")
    # a full fine-tune's modular index (the base's copy) may name the base's repo: name this one
    point_modular_index(folder, repo_id)
    if api is None:
        api = hub_api(token)
    step = "create"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        step = "upload"
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            token=token,
            commit_message=COMMIT_MESSAGE,
            ignore_patterns=list(HUB_IGNORE_PATTERNS),
        )
    except Exception as e:  # noqa: BLE001 - the boundary: every failure becomes a PublishError
        raise PublishError(redact(_hub_error_message(e, repo_id, step), [token])) from e
    url = str(repo_url) if repo_url else ""
    return HubUpload(url or f"https://huggingface.co/{repo_id}", getattr(commit, "oid", None) or None)


# ----------------------------------------------------------------------------- both


def publish(
    folder: Path,
    publish_spec,
    *,
    hf_token: str | None = None,
    s3_access_key_id: str | None = None,
    s3_secret_access_key: str | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, list[str] | str]:
    """Run every target ``publish_spec`` (a :class:`train.spec.PublishSpec`) configures: the Hub, then S3.

    Returns ``{"hub": repo_url, "hub_revision": commit, "s3": [urls]}`` with only the targets that ran. The first failure
    raises :class:`PublishError` (naming what was already published); nothing is skipped silently."""
    folder = Path(folder)
    results: dict[str, list[str] | str] = {}
    if publish_spec is None:
        return results
    n_files = len(list_files(folder)) if folder.is_dir() else 0

    def done_so_far() -> str:
        if not results:
            return ""
        parts = [
            f"{k}: {v if isinstance(v, str) else f'{len(v)} files'}"
            for k, v in results.items()
            if k != "hub_revision"
        ]
        return f" (already published: {'; '.join(parts)})"

    if publish_spec.hub_model_id:
        up = publish_hub(folder, publish_spec.hub_model_id, private=publish_spec.hub_private, token=hf_token)
        results["hub"] = up.url
        if up.revision:
            results["hub_revision"] = up.revision
        log(f"publish: {n_files} files to {up.url}")
    if publish_spec.s3_bucket:
        try:
            urls = publish_s3(
                folder,
                publish_spec.s3_bucket,
                publish_spec.s3_prefix,
                endpoint_url=publish_spec.s3_endpoint_url,
                region=publish_spec.s3_region,
                public_base_url=publish_spec.s3_public_base_url,
                access_key_id=s3_access_key_id,
                secret_access_key=s3_secret_access_key,
            )
        except PublishError as e:
            if not results:
                raise
            raise PublishError(f"{e}{done_so_far()}") from e
        results["s3"] = urls
        prefix = _normalise_prefix(publish_spec.s3_prefix)
        target = f"s3://{publish_spec.s3_bucket}" + (f"/{prefix}" if prefix else "")
        log(f"publish: {len(urls)} files to {target}")
    return results
