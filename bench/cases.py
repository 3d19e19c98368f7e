"""Benchmark cases: full-size Flux.1-dev and SDXL architectures with random weights.

Random weights cost exactly what real ones do, and need no download. ``tiny=True`` swaps in
small configs so the harness itself runs (and is tested) on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from train.models.flux import configs as flux_configs
from train.models.sdxl import configs as sdxl_configs

# The architectures live with their families (train/models/<family>/configs.py, torch-free): the
# tiny writers build the same tiny configs, the benchmark the published full-size ones.
FLUX_DEV = flux_configs.TRANSFORMER
FLUX_TINY = flux_configs.TRANSFORMER_TINY
SDXL_UNET = sdxl_configs.UNET
SDXL_TINY = sdxl_configs.UNET_TINY


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


# The cases of the stock baseline (docs/benchmarks.md) and of the GPU speed targets. ``flux1024-44g``
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
