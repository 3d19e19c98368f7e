"""Cog trainings (Replicate's ``replicate.trainings.create(..., destination=...)``).

Same inputs and job as predict.py; returns ``TrainingOutput(weights=output.zip)``. The file
is not called train.py: Cog would load that as a module named ``train`` and shadow the
``train/`` package.
"""

from __future__ import annotations

from typing import Optional

from cog import BaseModel, Path, Secret

import cog_inputs as I


class TrainingOutput(BaseModel):
    weights: Path


class Trainer(I.JobRunner):
    def train(
        self,
        dataset: Path = I.DATASET,
        spec: str = I.SPEC,
        model: Optional[str] = I.MODEL,
        mode: Optional[str] = I.MODE,
        steps: Optional[int] = I.STEPS,
        learning_rate: Optional[float] = I.LEARNING_RATE,
        lora_rank: Optional[int] = I.LORA_RANK,
        resolutions: Optional[str] = I.RESOLUTIONS,
        batch_size: Optional[int] = I.BATCH_SIZE,
        trigger_word: Optional[str] = I.TRIGGER_WORD,
        seed: Optional[int] = I.SEED,
        validation_prompts: Optional[str] = I.VALIDATION_PROMPTS,
        hf_token: Optional[Secret] = I.HF_TOKEN,
        hub_model_id: Optional[str] = I.HUB_MODEL_ID,
        hub_private: bool = I.HUB_PRIVATE,
        s3_bucket: Optional[str] = I.S3_BUCKET,
        s3_prefix: str = I.S3_PREFIX,
        s3_endpoint_url: Optional[str] = I.S3_ENDPOINT_URL,
        s3_region: Optional[str] = I.S3_REGION,
        s3_public_base_url: Optional[str] = I.S3_PUBLIC_BASE_URL,
        s3_access_key_id: Optional[Secret] = I.S3_ACCESS_KEY_ID,
        s3_secret_access_key: Optional[Secret] = I.S3_SECRET_ACCESS_KEY,
        resume_from: Optional[Path] = I.RESUME_FROM,
        return_checkpoint: bool = I.RETURN_CHECKPOINT,
    ) -> TrainingOutput:
        """Train on the dataset; ``weights`` is output.zip."""
        return TrainingOutput(weights=Path(self.run_request(
            dataset, spec, model=model, mode=mode, steps=steps, learning_rate=learning_rate, lora_rank=lora_rank,
            resolutions=resolutions, batch_size=batch_size, trigger_word=trigger_word, seed=seed,
            validation_prompts=validation_prompts, hf_token=hf_token, hub_model_id=hub_model_id,
            hub_private=hub_private, s3_bucket=s3_bucket, s3_prefix=s3_prefix, s3_endpoint_url=s3_endpoint_url,
            s3_region=s3_region, s3_public_base_url=s3_public_base_url, s3_access_key_id=s3_access_key_id,
            s3_secret_access_key=s3_secret_access_key, resume_from=resume_from, return_checkpoint=return_checkpoint)))

    # Cog's loader wants a run() on every runner class; in train mode it calls train().
    run = train
