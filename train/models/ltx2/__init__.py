"""LTX-2 (Lightricks' audio-video model): its registry entry (torch-free). Maths: ``family.py``; tiny
pipeline: ``tiny.py``; full-size architecture: ``configs.py``. docs/video.md."""

from __future__ import annotations

from ...model_info import ModelInfo, Shape
from ..flux import estimated

ORDER = 210  # after Wan

# The video stream's blocks only: its self-attention, its text cross-attention and its MLP. The
# audio stream and the audio<->video cross-attention are left as they are (docs/video.md).
_ATTN = r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
LTX2_PRESETS = {
    "attention": rf"transformer_blocks\.\d+\.{_ATTN}",
    "attention+mlp": rf"transformer_blocks\.\d+\.({_ATTN}|ff\.net\.0\.proj|ff\.net\.2)",
}


def _tokens(resolution: int, frames: int) -> int:
    """Sequence tokens of one sample: one per latent voxel (32x spatial, 8x temporal, 1x1x1 patches)
    plus the 1024 prompt tokens the connectors always return."""
    side = resolution // 32
    return side * side * ((frames - 1) // 8 + 1) + 1024


# Lightricks/LTX-2: an 18.9 B audio-video transformer (48 blocks; a 4096-wide video stream and a
# 2048-wide audio stream side by side, crossing in audio<->video attention), Gemma 3 12B as text
# encoder (all its hidden states, through the text connectors), a causal video VAE (32x spatial, 8x
# temporal, 128 channels), an audio VAE and a vocoder. Trained at 24 fps; the pipeline renders 121
# frames at 768x512 by default, 30 steps at guidance 3 (plus its spatio-temporal and modality
# guidance). A LoRA of the video stream trains on silent clips (docs/video.md).
LTX2 = ModelInfo(
    id="ltx-2",
    family="ltx2",
    title="LTX-2",
    base_weights="Lightricks/LTX-2",
    pipeline="LTX2Pipeline",
    denoiser="transformer",
    hub_tag="ltx-video",
    render_steps=30,
    render_guidance=3.0,
    target_presets=LTX2_PRESETS,
    default_targets="attention+mlp",
    text_tokens=1024,  # the pipeline's; the connectors' registers fill the padding, so no mask shortens it
    negative_prompt=True,
    denoiser_params_b=18.88,
    lora_params_m=81.79,
    kohya_params_m=81.79,
    text_encoder_params_b=12.2,
    vae_params_b=0.9,  # the video and audio VAEs, the vocoder and the text connectors (estimated)
    latent_factor=32,
    patch=1,
    comfy_naming="ltx2",
    kohya_architecture="ltx-2/lora",
    full_finetune="LTX-2's 18.9 B-parameter transformer needs ~189 GB for bf16 weights, gradients and Adam "
    "states, more than the largest single card (80 GB); train a LoRA",
    frame_step=8,
    max_frames=121,
    default_frames=(49,),
    fps=24.0,
    temporal_factor=8,
    default_resolution=512,
    **estimated(Shape(params_b=18.88, width=4096, blocks=48, tokens=_tokens(1024, 49))),
)

MODELS = (LTX2,)
