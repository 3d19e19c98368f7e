"""Cog's train entry: Replicate's trainings (``replicate.trainings.create(..., destination=...)``).

Cog inputs -> a ``train.service.JobRequest`` -> the trainer (``python -m train`` in a child
process) -> ``output.zip``. The return type is a top-level ``Path``: coglet uploads that to
the platform's file store (``--upload-url``) and Replicate turns it into the training's
``weights`` and the destination version's ``COG_WEIGHTS``. A ``Path`` nested in a BaseModel
(``TrainingOutput(weights=...)``) would come back inlined as a base64 data URI instead.

Not called train.py: Cog would load that as a module named ``train`` and shadow the ``train/``
package. Inputs are literal ``Input(...)`` calls: cog's static schema generator reads this file
without running it.
"""

from __future__ import annotations

import os
import time

from cog import BaseRunner, Input, Path, Secret


def _secret(value) -> str | None:
    if value is None:
        return None
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


def _fetch_checkpoint(req, uri: str, dest) -> Path:
    """The checkpoint a failed job delivered (S3 / Hub), fetched with this job's credentials."""
    from train.checkpoint import CheckpointError, fetch_checkpoint
    from train.service import JobError, build_spec

    print(f"resume: fetching the checkpoint from {uri}")
    try:
        return Path(fetch_checkpoint(uri, dest, build_spec(req).publish, req.secrets))
    except CheckpointError as exc:
        raise JobError(str(exc)) from None


class Trainer(BaseRunner):
    def setup(self) -> None:
        # the trainer's modules load with the runner, not when Cog reads this file for its inputs
        from train.service import JobFolders, detect_gpus, prewarm, processes_for
        from train.weights import prepare_weights_from_env

        started = time.monotonic()
        self.gpus = detect_gpus()
        self.processes = processes_for(self.gpus)
        if self.processes == 1:  # (a data-parallel job runs under torch's launcher instead)
            prewarm()  # the trainer's imports, in a process of their own, while the weights arrive
        self.weights = prepare_weights_from_env()
        self.jobs = JobFolders()
        names = ", ".join(g["name"] for g in self.gpus) or "none (CPU)"
        fetched = "".join(f", {k} {v:.1f} s" for k, v in self.weights.timings.items())
        print(
            f"setup: GPUs: {names}; processes per job: {self.processes}; base weights: "
            f"{', '.join(self.weights.models) or 'none cached'}; {time.monotonic() - started:.1f} s{fetched}"
        )
        for warning in self.weights.warnings:
            print(f"setup: note: {warning}")
        if os.environ.get("COG_WEIGHTS"):
            print(
                "setup: note: COG_WEIGHTS is set (this is a trained version); a training here starts from the "
                "base model, not from those weights"
            )

    def train(
        self,
        # One string literal per description: the static generator does not join adjacent literals.
        dataset: Path = Input(
            description="Dataset archive (zip, tar or tar.gz) of images with same-stem .txt captions, a metadata.jsonl or a captions.csv; for edit models before/after pairs (NAME.png + NAME_control.png, see docs/edit.md); a URL or a data URI"
        ),  # noqa: E501
        spec: str = Input(
            description="The whole training spec as JSON (see docs/spec.md); the typed inputs below override its fields",
            default="{}",
        ),
        model: str | None = Input(
            description="Model (overrides spec.model; see docs/families.md)",
            choices=[
                "flux-dev",
                "flux-schnell",
                "sdxl",
                "flux1-kontext-dev",
                "flux2-dev",
                "flux2-klein-4b",
                "flux2-klein-9b",
                "flux2-klein-base-4b",
                "flux2-klein-base-9b",
                "flux3-klein",
                "flux3-klein-distilled",
                "sd3.5-large",
                "sd3.5-medium",
                "chroma",
                "qwen-image",
                "qwen-image-2512",
                "qwen-image-2.1",
                "qwen-image-2.1-edit",
                "qwen-image-edit",
                "qwen-image-edit-plus",
                "qwen-image-edit-2511",
                "z-image-turbo",
                "z-image",
                "krea2",
                "hidream-i1-full",
                "hidream-i1-dev",
                "hidream-i1-fast",
                "wan2.1-t2v-1.3b",
                "wan2.1-t2v-14b",
                "wan2.1-i2v-14b",
                "wan2.2-ti2v-5b",
                "wan2.2-t2v-a14b",
                "wan2.2-i2v-a14b",
                "ltx-2",
            ],
            default=None,
        ),
        mode: str | None = Input(
            description="lora or full fine-tune (overrides spec.mode); full needs hub_model_id or s3_bucket: the model is published there",
            choices=["lora", "full"],
            default=None,
        ),
        steps: int | None = Input(description="Optimizer steps", ge=1, le=1000000, default=None),
        learning_rate: float | None = Input(description="Peak learning rate", ge=1e-7, le=10, default=None),
        lora_rank: int | None = Input(description="LoRA rank", ge=1, le=1024, default=None),
        lora_type: str | None = Input(
            description="The adapter: lora, or LyCORIS lokr (Kronecker product: far fewer parameters, a usual choice for styles) or loha (Hadamard product); see docs/spec.md",
            choices=["lora", "lokr", "loha"],
            default=None,
        ),
        resolutions: str | None = Input(
            description='Training resolutions, e.g. "512,768,1024"',
            regex=r"^\s*\d+(\s*,\s*\d+)*\s*$",
            default=None,
        ),
        batch_size: int | None = Input(description="Images per batch and GPU", ge=1, le=64, default=None),
        trigger_word: str | None = Input(
            description="Word put into every caption that lacks it", max_length=100, default=None
        ),
        seed: int | None = Input(description="Random seed", ge=0, le=4294967295, default=None),
        validation_prompts: str | None = Input(description="Validation prompts, one per line", default=None),
        autocaption: str | None = Input(
            description="Caption images with a vision-language model before training: missing (only those without a caption; yours are kept), all, or off (see docs/spec.md)",
            choices=["off", "missing", "all"],
            default=None,
        ),
        caption_prefix: str | None = Input(
            description="Put before each caption the captioner writes, e.g. 'a photo of'",
            max_length=500,
            default=None,
        ),
        caption_suffix: str | None = Input(
            description="Put after each caption the captioner writes", max_length=500, default=None
        ),
        class_word: str | None = Input(
            description="Output preservation: the class the trigger word is an instance of (person, dog, style); on prompts with it in the trigger word's place the LoRA is trained to leave the base model's output alone (about 2.3x the time a step; see docs/spec.md)",
            max_length=100,
            default=None,
        ),
        ema_decay: float | None = Input(
            description="Deliver a moving average of the LoRA weights instead of the last step's: 0 off, e.g. 0.99 (see docs/spec.md)",
            ge=0,
            le=0.9999,
            default=None,
        ),
        hf_token: Secret | None = Input(
            description="Hugging Face token: gated base models and Hub publishing", default=None
        ),
        hub_model_id: str | None = Input(
            description="Publish the result to this Hugging Face repo (owner/name)",
            regex=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
            default=None,
        ),
        hub_private: bool = Input(description="Make the Hub repo private", default=True),
        s3_bucket: str | None = Input(
            description="Publish the output files to this S3-compatible bucket",
            regex=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
            default=None,
        ),
        s3_prefix: str = Input(description="Key prefix inside the bucket", max_length=900, default=""),
        s3_endpoint_url: str | None = Input(
            description="Endpoint of a non-AWS store (MinIO, B2, R2)", regex=r"^https?://", default=None
        ),
        s3_region: str | None = Input(description="Bucket region", max_length=64, default=None),
        s3_public_base_url: str | None = Input(
            description="Public URL of the bucket, for the links in the log",
            regex=r"^https?://",
            default=None,
        ),
        s3_access_key_id: Secret | None = Input(description="S3 access key id", default=None),
        s3_secret_access_key: Secret | None = Input(description="S3 secret access key", default=None),
        resume_from: Path | None = Input(
            description="A checkpoint archive to continue from: a checkpoint, or a finished resumable job's output.zip",
            default=None,
        ),
        resume_checkpoint: str | None = Input(
            description="Where a failed or canceled job delivered its checkpoint: s3://bucket/prefix (read with the s3_* inputs) or hf://owner/name (with hf_token)",
            regex=r"^(s3|hf)://\S+$",
            default=None,
        ),
        return_checkpoint: bool = Input(
            description="Include resumable checkpoints in the output archive", default=False
        ),
    ) -> Path:
        """Train on the dataset; returns output.zip (LoRA files, samples, config.json, model card)."""
        from train.service import JobError, JobRequest, run_job

        prompts = (
            [p.strip() for p in validation_prompts.splitlines() if p.strip()] if validation_prompts else None
        )
        overrides = {
            "model": model,
            "mode": mode,
            "steps": steps,
            "learning_rate": learning_rate,
            "lora.rank": lora_rank,
            "lora.type": lora_type,
            "resolutions": resolutions,
            "batch_size": batch_size,
            "trigger_word": trigger_word,
            "seed": seed,
            "validation.prompts": prompts,
            "autocaption.mode": autocaption,
            "autocaption.prefix": caption_prefix,
            "autocaption.suffix": caption_suffix,
            "preservation.class_word": class_word,
            "ema.decay": ema_decay,
            "publish.hub_model_id": hub_model_id,
            "publish.hub_private": hub_private,
            "publish.s3_bucket": s3_bucket,
            "publish.s3_prefix": s3_prefix,
            "publish.s3_endpoint_url": s3_endpoint_url,
            "publish.s3_region": s3_region,
            "publish.s3_public_base_url": s3_public_base_url,
        }
        secrets = {
            "HF_TOKEN": _secret(hf_token),
            "AWS_ACCESS_KEY_ID": _secret(s3_access_key_id),
            "AWS_SECRET_ACCESS_KEY": _secret(s3_secret_access_key),
        }
        req = JobRequest(
            dataset=Path(dataset),
            spec_json=spec,
            overrides=overrides,
            secrets={k: v for k, v in secrets.items() if v},
            resume_from=Path(resume_from) if resume_from else None,
            return_checkpoint=bool(return_checkpoint),
            num_processes=self.processes,
        )
        try:
            workdir = self.jobs.new()
            if resume_checkpoint:
                req.resume_from = _fetch_checkpoint(req, resume_checkpoint, workdir / "resume-checkpoint")
            return Path(run_job(req, workdir))
        except JobError as exc:
            raise RuntimeError(str(exc)) from None

    # Cog's loader wants a run() on every runner class; in train mode it calls train().
    run = train
