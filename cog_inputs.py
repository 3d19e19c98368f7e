"""The Cog inputs shared by predict.py (predictions) and cog_train.py (trainings), and their
translation into a ``train.service.JobRequest``. Declared once here; the two entry points only
list them in their signatures, because Cog reads inputs from the function's own argument list."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cog import BaseRunner, Input

from train.spec import MODEL_FAMILIES

DATASET = Input(description="Dataset archive (zip, tar or tar.gz) of images with same-stem .txt captions, "
                            "a metadata.jsonl or a captions.csv; a URL or a data URI")
SPEC = Input(default="{}", description="The whole training spec as JSON (see docs/spec.md); the typed inputs "
                                       "below override its fields")
MODEL = Input(default=None, choices=list(MODEL_FAMILIES), description="Model family (overrides spec.model)")
MODE = Input(default=None, choices=["lora", "full"], description="lora or full fine-tune (overrides spec.mode)")
STEPS = Input(default=None, ge=1, le=100_000, description="Optimizer steps")
LEARNING_RATE = Input(default=None, ge=1e-7, le=10.0, description="Peak learning rate")
LORA_RANK = Input(default=None, ge=1, le=1024, description="LoRA rank")
RESOLUTIONS = Input(default=None, regex=r"^\s*\d+(\s*,\s*\d+)*\s*$",
                    description='Training resolutions, e.g. "512,768,1024"')
BATCH_SIZE = Input(default=None, ge=1, le=64, description="Images per batch and GPU")
TRIGGER_WORD = Input(default=None, max_length=100, description="Word put into every caption that lacks it")
SEED = Input(default=None, ge=0, le=2**32 - 1, description="Random seed")
VALIDATION_PROMPTS = Input(default=None, description="Validation prompts, one per line")
HF_TOKEN = Input(default=None, description="Hugging Face token: gated base models and Hub publishing")
HUB_MODEL_ID = Input(default=None, regex=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
                     description="Publish the result to this Hugging Face repo (owner/name)")
HUB_PRIVATE = Input(default=True, description="Make the Hub repo private")
S3_BUCKET = Input(default=None, description="Publish the output files to this S3-compatible bucket")
S3_PREFIX = Input(default="", description="Key prefix inside the bucket")
S3_ENDPOINT_URL = Input(default=None, description="Endpoint of a non-AWS store (MinIO, B2, R2)")
S3_REGION = Input(default=None, description="Bucket region")
S3_PUBLIC_BASE_URL = Input(default=None, description="Public URL of the bucket, for the links in the log")
S3_ACCESS_KEY_ID = Input(default=None, description="S3 access key id")
S3_SECRET_ACCESS_KEY = Input(default=None, description="S3 secret access key")
RESUME_FROM = Input(default=None, description="A checkpoint archive to continue from")
RETURN_CHECKPOINT = Input(default=False, description="Include resumable checkpoints in the output archive")


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return getter() if getter else str(value)


def job_request(dataset: Path, spec: str, *, model, mode, steps, learning_rate, lora_rank, resolutions, batch_size,
                trigger_word, seed, validation_prompts, hf_token, hub_model_id, hub_private, s3_bucket, s3_prefix,
                s3_endpoint_url, s3_region, s3_public_base_url, s3_access_key_id, s3_secret_access_key,
                resume_from, return_checkpoint, num_processes: int):
    from train.service import JobRequest

    prompts = [p.strip() for p in validation_prompts.splitlines() if p.strip()] if validation_prompts else None
    overrides = {
        "model": model, "mode": mode, "steps": steps, "learning_rate": learning_rate, "lora.rank": lora_rank,
        "resolutions": resolutions, "batch_size": batch_size, "trigger_word": trigger_word, "seed": seed,
        "validation.prompts": prompts, "publish.hub_model_id": hub_model_id, "publish.hub_private": hub_private,
        "publish.s3_bucket": s3_bucket, "publish.s3_prefix": s3_prefix, "publish.s3_endpoint_url": s3_endpoint_url,
        "publish.s3_region": s3_region, "publish.s3_public_base_url": s3_public_base_url,
    }
    secrets = {"HF_TOKEN": _secret(hf_token), "AWS_ACCESS_KEY_ID": _secret(s3_access_key_id),
               "AWS_SECRET_ACCESS_KEY": _secret(s3_secret_access_key)}
    return JobRequest(dataset=Path(dataset), spec_json=spec, overrides=overrides,
                      secrets={k: v for k, v in secrets.items() if v}, resume_from=Path(resume_from) if resume_from else None,
                      return_checkpoint=bool(return_checkpoint), num_processes=num_processes)


class JobFolders:
    """One scratch folder per job; the previous job's is removed when the next starts (Cog reads
    the returned archive after ``run`` returns, so it cannot go at the end of the job itself)."""

    def __init__(self) -> None:
        self.root = Path(os.environ.get("ADVANCED_TRAINER_JOBS_DIR") or tempfile.gettempdir())
        self.current: Path | None = None

    def new(self) -> Path:
        if self.current is not None:
            shutil.rmtree(self.current, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.current = Path(tempfile.mkdtemp(prefix="job-", dir=self.root))
        return self.current


def num_processes(gpus: list) -> int:
    """One process per GPU; ADVANCED_TRAINER_NUM_PROCESSES overrides (e.g. gloo processes on a CPU)."""
    forced = os.environ.get("ADVANCED_TRAINER_NUM_PROCESSES")
    return int(forced) if forced else max(1, len(gpus))


class JobRunner(BaseRunner):
    """What predictions and trainings share: setup (GPUs, base weights) and running one job."""

    def setup(self) -> None:
        from train.service import detect_gpus

        self.gpus = detect_gpus()
        self.weights = check_base_weights()
        self.jobs = JobFolders()
        names = ", ".join(g["name"] for g in self.gpus) or "none (CPU)"
        print(f"setup: GPUs: {names}; processes per job: {num_processes(self.gpus)}; base weights: "
              f"{', '.join(self.weights.models) or 'none cached'}")

    def run_request(self, dataset: Path, spec: str, **inputs: Any) -> Path:
        from train.service import JobError, run_job

        req = job_request(dataset, spec, num_processes=num_processes(self.gpus), **inputs)
        try:
            return run_job(req, self.jobs.new())
        except JobError as exc:
            raise RuntimeError(str(exc)) from None


def check_base_weights():
    """Check the base-weights cache (fetching COG_WEIGHTS first, if set) as the environment says.

    ADVANCED_TRAINER_REQUIRED_WEIGHTS: comma-separated folder names or Hub ids that must be usable;
    ADVANCED_TRAINER_ALLOW_HUB=1: missing ones may come from the Hub (HF_TOKEN for gated repos).
    """
    from train.weights import WEIGHTS_DIR, prepare_weights

    required = [n.strip() for n in os.environ.get("ADVANCED_TRAINER_REQUIRED_WEIGHTS", "").split(",") if n.strip()]
    return prepare_weights(WEIGHTS_DIR, source=os.environ.get("COG_WEIGHTS") or None, required=required or None,
                           allow_hub=os.environ.get("ADVANCED_TRAINER_ALLOW_HUB", "") == "1",
                           hf_token=os.environ.get("HF_TOKEN") or None)
