"""Jobs: submit, list, follow, cancel, resume or continue, try the trained weights, and the
delivered files (with the step selection: contact sheet, scores, kept steps)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from train.spec import parse_spec

from ..config import outputs_dir
from ..delivery import step_choice
from ..errors import ClientError, UserError
from ..jobs import submit
from ..providers import Provider
from ..records import TERMINAL
from ..resume import continue_job, resume_job
from ..run import resolve_target, run
from .models import CarryOnRequest, RunRequest, SubmitRequest
from .state import State, StateDep, job_or_404, public_record

router = APIRouter(prefix="/api/cloud/jobs", tags=["jobs"])


@router.post("/submit", status_code=201)
def submit_job(state: StateDep, body: SubmitRequest) -> dict:
    """Pack (or check) the dataset, upload it and start a training; answers once it is created."""
    spec = parse_spec(body.spec, **(body.overrides or {}))
    s = state.settings()
    provider: Provider
    if body.provider == "cog":
        provider = state.cog_provider(body.cog_url)
        webhook = f"{state.local_url}/api/webhooks/cog/{state.cog_hook_key}"
    else:
        provider = state.replicate()
        webhook = s.webhook_url()
    sub = submit(
        state.store,
        provider,
        s,
        spec,
        Path(body.dataset),
        hardware=body.hardware,
        destination=body.destination,
        webhook=webhook,
        fit=body.fit,
        scale_steps=body.scale_steps_to_gpus,
        extra_inputs={"return_checkpoint": True} if body.keep_checkpoint else None,
        log=lambda m: None,
    )
    return {
        "job": public_record(sub.record),
        "estimate_usd": round(sub.estimate.usd, 4),
        "warnings": sub.warnings,
    }


def _carry_webhook(state: State, provider: Provider) -> str | None:
    if provider.name == "cog":
        return f"{state.local_url}/api/webhooks/cog/{state.cog_hook_key}"
    return state.settings().webhook_url()


@router.post("/{job_id}/resume", status_code=201)
def resume(state: StateDep, job_id: str, body: CarryOnRequest) -> dict:
    """A training that carries a failed or canceled job on from its last delivered checkpoint."""
    rec = job_or_404(state, job_id)
    provider = state.provider_for(rec)
    dataset = Path(body.dataset) if body.dataset else None
    webhook = _carry_webhook(state, provider)
    sub = resume_job(
        state.store, provider, state.settings(), rec, dataset=dataset, webhook=webhook, log=lambda m: None
    )
    return {"job": public_record(sub.record), "estimate_usd": round(sub.estimate.usd, 4)}


@router.post("/{job_id}/continue", status_code=201)
def continue_(state: StateDep, job_id: str, body: CarryOnRequest) -> dict:
    """A training that trains a succeeded resumable job ``steps`` steps further."""
    rec = job_or_404(state, job_id)
    if body.steps is None:
        raise UserError("steps: how many steps to train beyond the job's is required")
    provider = state.provider_for(rec)
    dataset = Path(body.dataset) if body.dataset else None
    webhook = _carry_webhook(state, provider)
    sub = continue_job(
        state.store,
        provider,
        state.settings(),
        rec,
        body.steps,
        dataset=dataset,
        webhook=webhook,
        log=lambda m: None,
    )
    return {"job": public_record(sub.record), "estimate_usd": round(sub.estimate.usd, 4)}


@router.get("")
def list_jobs(state: StateDep, limit: int = 50, status: str | None = None) -> dict:
    return {"jobs": [public_record(r) for r in state.store.list(limit=min(limit, 500), status=status)]}


@router.get("/{job_id}")
def get_job(state: StateDep, job_id: str) -> dict:
    return {"job": public_record(job_or_404(state, job_id))}


@router.post("/{job_id}/cancel")
def cancel_job(state: StateDep, job_id: str) -> dict:
    rec = job_or_404(state, job_id)
    obj = state.provider_for(rec).cancel(rec["kind"], job_id)
    merged, _ = state.store.apply_remote(job_id, obj, "poll")
    return {"job": public_record(merged)}


def _run_provider(state: State, target_provider: str) -> Provider:
    if target_provider != "cog":
        return state.replicate()
    url = state.settings().cog_run_url
    if not url:
        raise UserError(
            "trying a Cog job needs cog_run_url: a Cog server in run mode "
            '(PUT /api/cloud/providers/replicate {"cog_run_url": ...})'
        )
    return state.cog_provider(url)


@router.post("/{job_id}/run")
def try_job(state: StateDep, job_id: str, body: RunRequest) -> dict:
    """Render with a succeeded training's weights: on Replicate a prediction on the destination's
    new version; the images land in cloud_outputs/<job id>/tries/<prediction id>/."""
    rec = job_or_404(state, job_id)
    folder = outputs_dir(state.root) / job_id
    target = resolve_target(state.store, job_id)
    result = run(
        _run_provider(state, target.provider),
        target,
        body.model_dump(exclude_none=True),
        lambda pred_id: folder / "tries" / pred_id,
    )
    if not rec.get("local_dir"):
        state.store.update(job_id, local_dir=str(folder))
    base = Path(rec.get("local_dir") or folder)
    images = [p.relative_to(base).as_posix() for p in result.images]
    return {
        "id": result.prediction.get("id"),
        "status": result.prediction.get("status"),
        "predict_time": (result.prediction.get("metrics") or {}).get("predict_time"),
        "images": [{"path": p, "url": f"/api/cloud/jobs/{job_id}/files/{p}"} for p in images],
    }


@router.get("/{job_id}/files")
def job_files(state: StateDep, job_id: str) -> dict:
    rec = job_or_404(state, job_id)
    local_dir = rec["local_dir"]
    folder = Path(local_dir) if local_dir else None
    if folder is None or not folder.is_dir():
        return {"files": [], "delivered": False}
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    found = {p.relative_to(folder).as_posix() for p in files}
    return {
        "delivered": True,
        "selection": _selection(job_id, folder, found),
        "files": [
            {
                "path": p.relative_to(folder).as_posix(),
                "bytes": p.stat().st_size,
                "url": f"/api/cloud/jobs/{job_id}/files/{p.relative_to(folder).as_posix()}",
            }
            for p in files
        ],
    }


def _selection(job_id: str, folder: Path, found: set[str]) -> dict:
    """The step choice with links: the contact sheet, and each kept step's LoRA."""
    choice = step_choice(folder, found)

    def url(path: str | None) -> str | None:
        return f"/api/cloud/jobs/{job_id}/files/{Path(path).relative_to(folder).as_posix()}" if path else None

    return {
        **choice,
        "contact_sheet": url(choice["contact_sheet"]),
        "scores": url(choice["scores"]),
        "kept_steps": {step: url(path) for step, path in choice["kept_steps"].items()},
    }


@router.get("/{job_id}/files/{name:path}")
def job_file(state: StateDep, job_id: str, name: str) -> FileResponse:
    rec = state.store.get(job_id)
    local_dir = rec["local_dir"] if rec is not None else None
    if not local_dir:
        raise HTTPException(404, f"no delivered outputs for {job_id}")
    folder = Path(local_dir).resolve()
    path = (folder / name).resolve()
    if not path.is_relative_to(folder) or not path.is_file():
        raise HTTPException(404, f"no file {name}")
    return FileResponse(path)


@router.get("/{job_id}/logs")
def job_logs(state: StateDep, job_id: str) -> dict:
    rec = job_or_404(state, job_id)
    logs = rec.get("logs_tail") or ""
    if rec["status"] not in TERMINAL or not logs:
        try:
            obj = state.provider_for(rec).get(rec["kind"], job_id)
            state.store.apply_remote(job_id, obj, "poll")
            logs = obj.get("logs") or logs
        except ClientError:  # the provider is unreachable or the job unknown there: show what the store holds
            pass
    return {"id": job_id, "logs": logs}
