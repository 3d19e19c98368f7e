"""Benchmark cases: full-size Flux.1-dev and SDXL architectures with random weights.

Random weights cost exactly what real ones do, and need no download. ``tiny=True`` swaps in
small configs so the harness itself runs (and is tested) on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FLUX_DEV: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_TINY: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)
SDXL_TINY: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 1),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    use_linear_projection=True,
    norm_num_groups=32,
)


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # flux | sdxl
    resolution: int
    batch_size: int
    text_tokens: int  # T5 tokens (Flux) / CLIP tokens (SDXL)
    memory_gib: float | None = None  # run as if the card had this much memory (memory policy auto)

    def config(self, tiny: bool) -> dict[str, Any]:
        if self.family == "flux":
            return FLUX_TINY if tiny else FLUX_DEV
        return SDXL_TINY if tiny else SDXL_UNET

    def scaled(self, tiny: bool) -> Case:
        """The tiny stand-in: same family and shape logic, CPU-sized."""
        if not tiny:
            return self
        return Case(
            self.name,
            self.family,
            {1024: 64, 512: 32}[self.resolution],
            min(self.batch_size, 2),
            8 if self.family == "flux" else 77,
            self.memory_gib,
        )


# The cases of shared/reference/gpu-baseline.md and of the GPU speed targets. ``flux1024-44g``
# is flux1024 on a card of an L40S's 44 GiB: the project under memory policy auto, the stock
# side with gradient checkpointing (what a stock user does when it does not fit).
CASES = {
    "flux1024": Case("flux1024", "flux", 1024, 1, 512),
    "flux512": Case("flux512", "flux", 512, 1, 512),
    "sdxl1024": Case("sdxl1024", "sdxl", 1024, 4, 77),
    "flux1024-44g": Case("flux1024-44g", "flux", 1024, 1, 512, memory_gib=44.0),
}

# Targets (s/step on one H200, median after warm-up). The memory case's target is relative:
# at most MEMORY_CASE_SLOWDOWN x the project's unconstrained flux1024 step, peak within the limit.
TARGET_S_PER_STEP = {"flux1024": 0.30, "flux512": 0.12, "sdxl1024": 0.17}
MEMORY_CASE_SLOWDOWN = 1.3
