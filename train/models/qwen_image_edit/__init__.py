"""Qwen-Image-Edit, Qwen-Image-Edit-2509 ("Edit Plus") and -2511: the registry entries (torch-free).
Maths: ``family.py`` (Qwen-Image's, conditioned on control images); tiny pipelines: ``tiny.py``."""

from __future__ import annotations

from dataclasses import replace

from ...model_info import Shape
from ..flux import estimated
from ..qwen_image import BLOCKS, PARAMS_B, QWEN_IMAGE, WIDTH

ORDER = 90


def _step_s(text_tokens: int) -> dict[str, float]:
    """Step seconds at 1024 px: the target's and the control's 4096 image tokens each, and the text."""
    return estimated(Shape(PARAMS_B, WIDTH, BLOCKS, tokens=2 * 4096 + text_tokens))["step_s"]


# Qwen/Qwen-Image-Edit: Qwen-Image's transformer and VAE trained to edit; the control image enters
# twice: its VAE latents join the sequence after the target's, and Qwen2.5-VL reads it with the
# instruction (so the text embeddings depend on the control image). Model card: 50 steps,
# true_cfg_scale 4.0, negative prompt " ". The text stream carries the VL's image tokens too: the
# pipeline reads its control at ~1 MP (1036 x 1036 for the VL: 37 x 37 = 1369 tokens), plus the
# vision start / end and the template's 5 tokens after the prompt.
QWEN_IMAGE_EDIT = replace(
    QWEN_IMAGE,
    id="qwen-image-edit",
    family="qwen_image_edit",
    title="Qwen-Image-Edit",
    base_weights="Qwen/Qwen-Image-Edit",
    pipeline="QwenImageEditPipeline",
    kohya_architecture="qwen-image-edit/lora",
    fixed_text_tokens=1369 + 2 + 5,
    step_s=_step_s(512 + 1376),
    max_controls=1,
    controls_required=True,
)
# Qwen/Qwen-Image-Edit-2509 ("Edit Plus"): the same architecture, up to three control images (each
# read by Qwen2.5-VL at ~384x384 and VAE-encoded at ~1 MP), QwenImageEditPlusPipeline. Text tokens
# besides the prompt, for one control: 14 x 14 = 196 image tokens, "Picture 1: " and the vision
# start / end (7), the template's 5 after the prompt.
QWEN_IMAGE_EDIT_PLUS = replace(
    QWEN_IMAGE_EDIT,
    id="qwen-image-edit-plus",
    title="Qwen-Image-Edit-2509",
    base_weights="Qwen/Qwen-Image-Edit-2509",
    pipeline="QwenImageEditPlusPipeline",
    kohya_architecture="qwen-image-edit-plus/lora",
    fixed_text_tokens=196 + 7 + 5,
    step_s=_step_s(512 + 208),
    max_controls=3,
    tiny={"plus": True},
)

# Qwen/Qwen-Image-Edit-2511: Edit Plus's pipeline and sizes; its transformer config adds
# ``zero_cond_t``: the control images' tokens are modulated at time 0 (clean), the target's at the
# step's time (the transformer does it from ``img_shapes``, in training as at inference). The card
# renders 40 steps, true_cfg_scale 4.
QWEN_IMAGE_EDIT_2511 = replace(
    QWEN_IMAGE_EDIT_PLUS,
    id="qwen-image-edit-2511",
    title="Qwen-Image-Edit-2511",
    base_weights="Qwen/Qwen-Image-Edit-2511",
    render_steps=40,
    kohya_architecture="qwen-image-edit-2511/lora",
    tiny={"plus": True, "zero_cond_t": True},
)

MODELS = (QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS, QWEN_IMAGE_EDIT_2511)
