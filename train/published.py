"""A full fine-tune that travels through its publish target, not through Cog's upload.

On the Cog train entry a full fine-tune must name a publish target (``train.publish.
full_fine_tune_target_problem``): the model folder ``model/`` is published with the rest of the
output, and ``output.zip`` carries ``published_model.json`` in its place:

    {"format": "advanced-trainer/published-model/1", "folder": "model",
     "files": [{"path": "model_index.json", "size": 533}, ...],
     "hub": {"repo": "alice/my-sdxl", "revision": "<commit>", "private": true},
     "s3": {"uri": "s3://bucket/prefix/model", "public_url": "https://.../prefix/model",
            "endpoint_url": null, "region": null}}

The run entry (``train.inference``) reads that pointer from ``COG_WEIGHTS`` and fetches the folder
with ``fetch_published``: from the bucket's public URL (plain HTTP, no credentials), else from the
Hub at the pinned commit (anonymous for a public repo; a private one needs the run's ``hf_token``),
else from S3 with the credentials the container's environment holds. Each file's size is checked.

torch-free: the client and the train entry import it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .http import safe_url
from .weights import pipeline_index

POINTER_FILE = "published_model.json"
FORMAT = "advanced-trainer/published-model/1"
MODEL_DIR = "model"
_DONE = ".complete"  # written last into a fetched folder: a partial fetch is fetched again


class PublishedModelError(ValueError):
    """The published model cannot be fetched; the message says from where and why."""


class NeedsHubToken(PublishedModelError):
    """The model is in a Hub repo this caller may not read without a token (a private repo)."""


def write_pointer(out_dir: Path, publish_spec: Any, published: dict[str, Any]) -> Path | None:
    """``published_model.json`` for ``out_dir/model`` after ``train.publish.publish`` put it on the
    targets in ``published`` (its result); None when there is no model folder or no target took it."""
    folder = out_dir / MODEL_DIR
    if pipeline_index(folder) is None or not (published.get("hub") or published.get("s3")):
        return None
    files = [
        {"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    doc: dict[str, Any] = {"format": FORMAT, "folder": MODEL_DIR, "files": files}
    if published.get("hub"):
        doc["hub"] = {
            "repo": publish_spec.hub_model_id,
            "revision": published.get("hub_revision"),
            "private": bool(publish_spec.hub_private),
        }
    if published.get("s3"):
        prefix = publish_spec.s3_prefix.strip("/")
        key = f"{prefix}/{MODEL_DIR}" if prefix else MODEL_DIR
        public = publish_spec.s3_public_base_url
        doc["s3"] = {
            "uri": f"s3://{publish_spec.s3_bucket}/{key}",
            "public_url": f"{public.rstrip('/')}/{quote(key)}" if public else None,
            "endpoint_url": publish_spec.s3_endpoint_url,
            "region": publish_spec.s3_region,
        }
    path = out_dir / POINTER_FILE
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def read_pointer(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PublishedModelError(f"{path.name} is not readable JSON ({exc})") from None
    ok = (
        isinstance(doc, dict)
        and doc.get("format") == FORMAT
        and isinstance(doc.get("files"), list)
        and all(isinstance(f, dict) and _safe_rel(f.get("path")) for f in doc["files"])
        and (doc.get("hub") or doc.get("s3"))
    )
    if not ok:
        raise PublishedModelError(f"{path.name} is not a published-model pointer this version reads")
    return doc


def _safe_rel(path: Any) -> bool:
    """A relative path inside the folder (the pointer comes from whoever made the archive)."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def describe(doc: dict[str, Any]) -> str:
    where = []
    if doc.get("s3"):
        where.append(doc["s3"].get("public_url") or doc["s3"]["uri"])
    if doc.get("hub"):
        hub = doc["hub"]
        where.append(f"hf://{hub['repo']}" + (" (private)" if hub.get("private") else ""))
    return " or ".join(safe_url(w) for w in where)


def fetch_published(doc: dict[str, Any], cache_dir: Path, *, hf_token: str | None = None, log=print) -> Path:
    """The published model folder on this machine (fetched once into ``cache_dir``), tried from each
    source the pointer names. NeedsHubToken when only a Hub repo that needs a token is left."""
    import hashlib

    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]
    slot = Path(cache_dir) / f"published-{key}"
    folder = slot / MODEL_DIR
    if (slot / _DONE).is_file():
        return folder
    total = sum(int(f.get("size") or 0) for f in doc["files"])
    reasons: list[str] = []
    needs_token = False
    for name, fetch in _sources(doc, hf_token):
        shutil.rmtree(slot, ignore_errors=True)
        slot.mkdir(parents=True, exist_ok=True)
        log(
            f"setup: fetching the fine-tuned model ({len(doc['files'])} files, {total / 2**30:.2f} GiB) from {name}"
        )
        try:
            fetch(folder)
            _check_sizes(doc, folder)
        except NeedsHubToken as exc:
            needs_token = True
            reasons.append(str(exc))
            continue
        except PublishedModelError as exc:
            reasons.append(str(exc))
            continue
        (slot / _DONE).write_text("ok\n")
        return folder
    shutil.rmtree(slot, ignore_errors=True)
    cls = NeedsHubToken if needs_token else PublishedModelError  # a token may still open the Hub copy
    raise cls("; ".join(reasons))


def _check_sizes(doc: dict[str, Any], folder: Path) -> None:
    for f in doc["files"]:
        path = folder / f["path"]
        got = path.stat().st_size if path.is_file() else None
        if got != f.get("size"):
            raise PublishedModelError(f"{f['path']}: expected {f.get('size')} bytes, got {got}")


def _sources(doc: dict[str, Any], hf_token: str | None):
    s3, hub = doc.get("s3"), doc.get("hub")
    if s3 and s3.get("public_url"):
        yield safe_url(s3["public_url"]), lambda folder: _from_http(s3["public_url"], doc["files"], folder)
    if hub:
        yield f"hf://{hub['repo']}", lambda folder: _from_hub(hub, doc, folder, hf_token)
    if s3 and not s3.get("public_url"):
        yield s3["uri"], lambda folder: _from_s3(s3, doc["files"], folder)


def _from_http(base: str, files: list[dict], folder: Path) -> None:
    from .weights import WeightsError, download_url

    for f in files:
        try:
            download_url(f"{base.rstrip('/')}/{quote(f['path'])}", folder / f["path"])
        except WeightsError as exc:
            raise PublishedModelError(str(exc)) from None


def _from_hub(hub: dict, doc: dict, folder: Path, token: str | None) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    repo, root = hub["repo"], doc.get("folder") or MODEL_DIR
    local = folder.parent / ".hub"
    try:
        for f in doc["files"]:
            got = hf_hub_download(
                repo,
                f"{root}/{f['path']}",
                revision=hub.get("revision") or None,
                token=token or False,  # False: never a token saved on this machine, only the one given
                local_dir=local,
                endpoint=os.environ.get("HF_ENDPOINT") or None,
            )
            target = folder / f["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, target)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if not token:
            raise NeedsHubToken(
                f"hf_token: the fine-tuned model is in the Hugging Face repo {repo}, which cannot be read "
                f"without a token (private?); pass hf_token, a token that may read it"
            ) from None
        raise PublishedModelError(
            f"hf_token: the token given may not read the Hugging Face repo {repo} (HTTP {status})"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        why = " ".join(str(exc).split())[:300]
        raise PublishedModelError(f"hf://{repo}: {type(exc).__name__}: {why}") from None
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _from_s3(s3: dict, files: list[dict], folder: Path) -> None:
    from .publish import _s3_client

    bucket, _, prefix = s3["uri"].removeprefix("s3://").partition("/")
    try:
        client = _s3_client(
            s3.get("endpoint_url"), s3.get("region"), None, None
        )  # the environment's credentials
        for f in files:
            target = folder / f["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, f"{prefix}/{f['path']}", str(target))
    except Exception as exc:  # noqa: BLE001 - the boundary: no credentials, denied, unreachable
        why = " ".join(str(exc).split())[:300]
        raise PublishedModelError(
            f"{s3['uri']}: {type(exc).__name__}: {why} (this container reads the bucket with the credentials "
            f"of its environment; a training with s3_public_base_url lets it read over HTTP)"
        ) from None
