"""The request bodies of the local server's API, so /openapi.json documents each one and FastAPI
checks their shapes. What a field's *value* must be (a valid spec, a known setting, a dataset
that exists) is still checked where it is defined: ``train.spec``, ``client.settings_api``,
``client.pack``; those answer 422 with messages naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..spend import ACTIONS, PERIODS

SpecBody = dict[str, Any]
SPEC_DOC = "a training spec (see the spec reference); validated by train.spec, every bad field reported"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Login(_Body):
    api_key: str = Field(description="the API key `serve` printed when it was first bound beyond loopback")


class SpecRequest(_Body):
    spec: SpecBody = Field(default_factory=dict, description=SPEC_DOC)


SCALE_DOC = (
    "divide steps (and step intervals) by the machine's GPU count: the same images in fewer steps "
    "(batch_size is per GPU); never applied unless asked"
)


class EstimateRequest(SpecRequest):
    hardware: str | None = Field(None, description="one SKU (default: L40S, A100 and H100)")
    images: int | None = Field(None, ge=1, description="images in the dataset (default 20)")
    scale_steps_to_gpus: bool = Field(False, description=SCALE_DOC)


class InspectRequest(_Body):
    path: str = Field(description="a dataset folder or zip on this machine")


class SpendLimitBody(_Body):
    amount_usd: float | str = Field(description="USD per period (a number, or a numeric string)")
    # checked by SpendLimit (their one home), listed here for the document
    period: str = Field("monthly", json_schema_extra={"enum": list(PERIODS)})
    action: str = Field("block", json_schema_extra={"enum": list(ACTIONS)})


class SettingsChanges(_Body):
    """Only the fields sent change; ``null`` clears an optional one."""

    model: str | None = Field(None, description="owner/name of the trainer model")
    version: str | None = Field(None, description="a pinned 64-character version id; null = the latest")
    hardware: str | None = Field(None, description="a Replicate SKU: the trainer model's hardware")
    profiles: dict[str, str] | None = Field(
        None, description='SKU -> trainer model, e.g. {"gpu-h100-8x": "me/trainer-8x"}'
    )
    public_url: str | None = Field(None, description="the public base URL that reaches `serve` (webhooks)")
    cog_url: str | None = Field(None, description="a Cog server in train mode (provider cog)")
    cog_run_url: str | None = Field(None, description="a Cog server in run mode (trying a Cog job)")
    webhook_allowed_ips: list[str] | None = None
    trusted_proxies: list[str] | None = None
    allowed_hosts: list[str] | None = None
    spend_limit: SpendLimitBody | None = None


class TokenBody(_Body):
    token: str = Field(description="a Replicate API token (r8_...); stored in the 0600 secrets file")


class SubmitRequest(_Body):
    spec: SpecBody = Field(default_factory=dict, description=SPEC_DOC)
    overrides: dict[str, Any] | None = Field(
        None, description='spec fields to replace, e.g. {"lora.rank": 8}'
    )
    dataset: str = Field(description="a path on this machine: a dataset folder (packed for you) or a zip")
    provider: Literal["replicate", "cog"] = "replicate"
    cog_url: str | None = Field(None, description="provider cog: the Cog server (default: settings)")
    hardware: str | None = Field(
        None, description="a Replicate SKU; the training goes to its profile's trainer model"
    )
    scale_steps_to_gpus: bool = Field(False, description=SCALE_DOC)
    destination: str | None = Field(
        None, description="owner/name of the model the training writes a version of"
    )
    fit: bool = Field(False, description="downsize images when the dataset is over the upload limit")
    keep_checkpoint: bool = Field(
        False,
        description="return_checkpoint: a failed or canceled job's last checkpoint goes to the spec's "
        "publish target, so the job can be resumed",
    )


class CarryOnRequest(_Body):
    """Resume (failed / canceled) or continue (succeeded, resumable) a training."""

    steps: int | None = Field(None, ge=1, description="continue: optimizer steps beyond the job's")
    dataset: str | None = Field(
        None, description="upload this dataset again (default: reuse the job's upload)"
    )


class RunRequest(_Body):
    """The run entry's inputs the page's "try it" box may send (strict JSON types)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str | None = None
    aspect_ratio: str | None = None
    width: int | None = None
    height: int | None = None
    num_outputs: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    lora_scale: float | None = None
    output_format: str | None = None
    step: int | None = Field(None, description="a kept validation step (default: the chosen one)")
    input_image: str | None = Field(None, description="edit models: the image to edit, as a data: URI")
    input_images: list[str] | None = Field(None, description="further reference images (data: URIs)")
    num_frames: int | None = Field(None, description="video models: frames to render (default: the model's)")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip() or len(v) > 4000:
            raise ValueError("a prompt of 1 to 4000 characters is required")
        return v


# Routes that take a raw body (signature checks need the exact bytes; uploads are streamed)
# describe it in the OpenAPI document themselves.
_RAW_JOB = {
    "type": "object",
    "description": "a Replicate prediction or training object, as sent by the API "
    "(read raw: the signature covers the exact bytes)",
}
RAW_JSON_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _RAW_JOB}}}
}
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "the dataset zip"}
                    },
                }
            }
        },
    }
}
