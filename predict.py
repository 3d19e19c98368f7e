"""Cog's run entry: images (or, for a video model, videos) from a prompt, with the trained weights.

On Replicate a finished training becomes a new version of the destination model: this image
with ``COG_WEIGHTS`` set to the training's output, which Cog hands to ``setup(weights)``. So
``replicate.run("me/my-lora", input={"prompt": "a photo of TOK"})`` renders with the trained
LoRA (or full fine-tune). On the trainer's own version (no weights) it renders the base model,
or ``lora_weights``. A thin adapter over ``train.inference``; the training itself is
cog_train.py.

Inputs are written as literal ``Input(...)`` calls: cog's static schema generator reads this
file without running it and resolves nothing else (see docs/design.md, "The Cog package").
"""

from __future__ import annotations

import os
import shutil
import tempfile

from cog import BaseRunner, Input, Path, Secret


def _secret(value) -> str | None:
    if value is None:
        return None
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


class Predictor(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        # the trainer's modules load with the runner, not when Cog reads this file for its inputs
        from train.inference import InferenceSession

        self.session = InferenceSession(weights)
        self.out_root = Path(
            tempfile.mkdtemp(prefix="render-", dir=os.environ.get("ADVANCED_TRAINER_JOBS_DIR") or None)
        )
        self.count = 0

    def run(
        self,
        prompt: str = Input(
            description='What to draw, or for an edit model the instruction ("make the square red"). Put the trigger word in it (e.g. "a photo of TOK").'  # noqa: E501
        ),
        input_image: Path | None = Input(
            description="Edit models (flux1-kontext-dev, qwen-image-edit, ...): the image to edit; Flux.2: a reference image; image-to-video models (wan2.1-i2v-14b, wan2.2-i2v-a14b): the first frame to animate",  # noqa: E501
            default=None,
        ),
        input_images: list[Path] | None = Input(
            description="Models that take several references (qwen-image-edit-plus, Flux.2): further images after input_image",  # noqa: E501
            default=None,
        ),
        negative_prompt: str = Input(description="What not to draw (SDXL; Flux ignores it)", default=""),
        aspect_ratio: str = Input(
            description="Aspect ratio of the images (about one megapixel); match_input_image: the input image's (1:1 without one); custom: width and height below",  # noqa: E501
            choices=[
                "match_input_image",
                "1:1",
                "16:9",
                "21:9",
                "3:2",
                "2:3",
                "4:5",
                "5:4",
                "3:4",
                "4:3",
                "9:16",
                "9:21",
                "custom",
            ],
            default="match_input_image",
        ),
        width: int | None = Input(
            description="Width with aspect_ratio custom (rounded down to a multiple of 16)",
            ge=64,
            le=2048,
            default=None,
        ),
        height: int | None = Input(
            description="Height with aspect_ratio custom (rounded down to a multiple of 16)",
            ge=64,
            le=2048,
            default=None,
        ),
        num_outputs: int = Input(
            description="Number of images (seeds seed, seed+1, ...)", ge=1, le=4, default=1
        ),
        num_inference_steps: int | None = Input(
            description="Denoising steps; default 28 (flux-dev), 4 (flux-schnell), 30 (sdxl)",
            ge=1,
            le=100,
            default=None,
        ),
        guidance_scale: float | None = Input(
            description="Guidance; default 3.5 (flux-dev), 0 (flux-schnell), 5 (sdxl)",
            ge=0,
            le=20,
            default=None,
        ),
        seed: int | None = Input(
            description="Random seed; empty for a random one (it is logged)",
            ge=0,
            le=4294967295,
            default=None,
        ),
        lora_scale: float = Input(description="Strength of the LoRA", ge=-1, le=3, default=1.0),
        # One string literal per description: the static generator does not join adjacent literals.
        lora_weights: str | None = Input(
            description="Another LoRA instead of the trained one: a URL of an advanced-trainer output.zip, a .safetensors or another trainer's archive, or a Hugging Face repo (owner/name or owner/name/file.safetensors)",  # noqa: E501
            default=None,
        ),
        extra_lora: str | None = Input(
            description="A second LoRA stacked on the first (same forms as lora_weights)", default=None
        ),
        extra_lora_scale: float = Input(description="Strength of extra_lora", ge=-1, le=3, default=1.0),
        output_format: str = Input(
            description="Image format", choices=["webp", "jpg", "png"], default="webp"
        ),
        output_quality: int = Input(
            description="Quality of webp and jpg images (png is lossless) and of videos (100: lossless webp)",
            ge=0,
            le=100,
            default=90,
        ),
        num_frames: int | None = Input(
            description="Video models (wan..., ltx-2): frames to render, 4k+1 for Wan (default 81: 5 s at 16 fps), 8k+1 for LTX-2 (default 121: 5 s at 24 fps)",  # noqa: E501
            ge=1,
            le=257,
            default=None,
        ),
        fps: float | None = Input(
            description="Video models: frame rate of the written video (default the model's: 16 for Wan, 24 for LTX-2, which is conditioned on it)",  # noqa: E501
            ge=1,
            le=60,
            default=None,
        ),
        video_format: str = Input(
            description="Video models: mp4 (H.264; LTX-2's with its soundtrack in AAC) or an animated webp (silent)",  # noqa: E501
            choices=["mp4", "webp"],
            default="mp4",
        ),
        hf_token: Secret | None = Input(
            description="Hugging Face token for LoRAs in private repos, and for a full fine-tune published to a private repo",
            default=None,
        ),
        step: int | None = Input(
            description="A kept validation step of the trained LoRA to render with (see its contact_sheet.png); empty: the chosen step",
            ge=0,
            default=None,
        ),
    ) -> list[Path]:
        """Render the prompt; returns the images (a video model: the videos)."""
        from train.inference import InputError, RenderRequest

        # Cog reads the returned files after run() returns: the previous prediction's go now.
        shutil.rmtree(self.out_root / f"p{self.count}", ignore_errors=True)
        self.count += 1
        req = RenderRequest(
            prompt=prompt,
            input_images=tuple(str(p) for p in [input_image, *(input_images or [])] if p is not None),
            negative_prompt=negative_prompt,
            aspect_ratio=aspect_ratio,
            width=width,
            height=height,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            lora_scale=lora_scale,
            lora_weights=lora_weights or None,
            extra_lora=extra_lora or None,
            extra_lora_scale=extra_lora_scale,
            output_format=output_format,
            output_quality=output_quality,
            hf_token=_secret(hf_token),
            step=step,
            num_frames=num_frames,
            fps=fps,
            video_format=video_format,
        )
        try:
            paths = self.session.predict(req, self.out_root / f"p{self.count}")
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return [Path(p) for p in paths]
