"""Aspect-ratio bucketing over one or more target resolutions.

Each target resolution R gets a set of (width, height) buckets of about R*R pixels with
aspect ratios from 1:4 to 4:1, sides multiples of ``bucket_step(R)``. An image goes to the
bucket nearest its aspect ratio (in log space), is resized to cover it and centre-cropped.
Batches are drawn from one bucket at a time, so every batch has one shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

MAX_ASPECT = 4.0
# An image is not trained at a resolution that would need more than this upscale per side,
# unless that resolution is the smallest one asked for.
MAX_UPSCALE = 2.0


def bucket_step(resolution: int) -> int:
    """Side granularity: 64 px at 512 and above (what every family's latent grid needs), finer below."""
    return 64 if resolution >= 512 else 32 if resolution >= 256 else 16


def make_buckets(resolution: int, multiple: int = 16) -> list[tuple[int, int]]:
    """Buckets for one target resolution; sides are multiples of ``multiple`` (the model's grid) too."""
    # lcm, not max: a side must be a multiple of both (max only works when one divides the other).
    step = math.lcm(multiple, bucket_step(resolution))
    area = resolution * resolution
    out = set()
    w = step
    while w <= resolution * 4:
        h = (area // w) // step * step
        if h >= step and 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
            # Both orientations: rounding h down made the set lopsided (e.g. 704x320 and 832x256
            # existed at 512 but not 320x704 / 256x832), so portrait images got worse-fitting buckets
            # than the same images turned landscape.
            out.add((w, h))
            out.add((h, w))
        w += step
    side = resolution // step * step
    out.add((side, side))
    return sorted(out)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


@dataclass(frozen=True)
class Placement:
    """Where one image lands at one resolution (and what SDXL's add_time_ids need)."""

    resolution: int
    bucket: tuple[int, int]  # (width, height) after crop
    original_size: tuple[int, int]  # (height, width) of the source
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


def place(width: int, height: int, resolutions: list[int], multiple: int = 16) -> list[Placement]:
    """The placements of a ``width`` x ``height`` image over the target resolutions."""
    placements = []
    for i, res in enumerate(sorted(resolutions)):
        bucket = nearest_bucket(width, height, make_buckets(res, multiple))
        scale = max(bucket[0] / width, bucket[1] / height)
        if i > 0 and scale > MAX_UPSCALE:
            continue
        new_w, new_h = max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale))
        top, left = (new_h - bucket[1]) // 2, (new_w - bucket[0]) // 2
        placements.append(Placement(res, bucket, (height, width), (top, left)))
    return placements


def resize_and_crop(img: Image.Image, p: Placement) -> Image.Image:
    bw, bh = p.bucket
    scale = max(bw / img.width, bh / img.height)
    new_w, new_h = max(bw, round(img.width * scale)), max(bh, round(img.height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    top, left = p.crop_top_left
    return img.crop((left, top, left + bw, top + bh))


def bucket_key(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"
