"""Helpers for the page's submit form: spec validation, estimates, dataset upload and inspection.
A bad spec raises ``SpecError``, answered 422 ``{"problems": [...]}`` by the app's handler."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from train.spec import parse_spec

from ..calibration import Calibration
from ..errors import UserError
from ..estimates import DEFAULT_SKUS, estimate_row
from ..pack import UPLOAD_LIMIT, PackError, inspect_folder
from .models import UPLOAD_BODY, EstimateRequest, InspectRequest, SpecRequest
from .state import StateDep

router = APIRouter(prefix="/api/cloud", tags=["datasets"])


@router.post("/spec/validate")
def validate_spec(body: SpecRequest) -> dict:
    spec = parse_spec(body.spec)
    return {"ok": True, "spec": json.loads(spec.to_json())}


@router.post("/estimate")
def estimate(state: StateDep, body: EstimateRequest) -> dict:
    """Time and cost per SKU, calibrated from this store's finished jobs where it has such jobs;
    each row names the trainer model of the SKU's profile."""
    spec = parse_spec(body.spec)
    calibration = Calibration.from_store(state.store)
    settings = state.settings()
    try:
        rows = [
            estimate_row(spec, sku, body.images or 20, calibration, settings, body.scale_steps_to_gpus)
            for sku in ([body.hardware] if body.hardware else DEFAULT_SKUS)
        ]
    except UserError as exc:
        raise UserError(f"hardware: {exc}", 422) from None
    return {"estimates": rows}


@router.post("/datasets", status_code=201, openapi_extra=UPLOAD_BODY)
async def upload_dataset(state: StateDep, request: Request) -> dict:
    """A dataset zip uploaded by the page (multipart field ``file``), kept under the state folder.
    The form is read here rather than declared as a parameter so that a missing field gets the
    page's message shape; the body is documented by ``UPLOAD_BODY``."""
    form = await request.form()
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise UserError("file: attach the dataset zip as the multipart field 'file'", 422)
    folder = state.root / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{secrets.token_hex(8)}.zip"
    size = 0
    with open(target, "wb") as f:
        while chunk := await upload.read(1 << 20):
            f.write(chunk)
            size += len(chunk)
    return {
        "path": str(target),
        "bytes": size,
        "limit_bytes": UPLOAD_LIMIT,
        "over_limit": size > UPLOAD_LIMIT,
    }


@router.post("/datasets/inspect")
def inspect_dataset(body: InspectRequest) -> dict:
    path = Path(body.path)
    if not body.path or not path.exists():
        raise UserError(f"path: {path} does not exist on this machine", 422)
    if path.is_file():
        size = path.stat().st_size
        return {
            "kind": "zip",
            "bytes": size,
            "images": None,
            "limit_bytes": UPLOAD_LIMIT,
            "over_limit": size > UPLOAD_LIMIT,
            "largest": [],
        }
    try:
        info = inspect_folder(path)
    except PackError as exc:
        raise UserError(f"path: {exc}", 422) from None
    return {"kind": "folder", "limit_bytes": UPLOAD_LIMIT, "over_limit": info["bytes"] > UPLOAD_LIMIT, **info}
