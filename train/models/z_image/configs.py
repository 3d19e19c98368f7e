"""Z-Image's denoiser at full size (torch-free): Tongyi-MAI/Z-Image-Turbo's (and Z-Image's)
``transformer/config.json``: 3840 wide, 30 blocks + 2 noise-refiner + 2 context-refiner blocks,
Qwen3-4B's 2560-wide text states."""

from __future__ import annotations

from typing import Any

DENOISER_CLASS = "ZImageTransformer2DModel"
TRANSFORMER: dict[str, Any] = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-05,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1024, 512, 512],
)
DENOISERS: dict[str, dict[str, Any]] = {"z-image-turbo": TRANSFORMER, "z-image": TRANSFORMER}
