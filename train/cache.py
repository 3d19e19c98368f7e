"""Latents and text embeddings, computed once before training.

Every (image, resolution) placement is encoded by the VAE once; its posterior mean and std
are kept so each step samples a fresh latent (as encoding anew would) without the VAE.
Every distinct caption, the empty caption (for caption dropout) and the validation prompts
are encoded once. After this the VAE and text encoders can leave the accelerator.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .buckets import Placement, bucket_key, place, resize_and_crop
from .data import StagedDataset, load_rgb
from .models.base import Batch, BatchRandom, Family


@dataclass
class CachedItem:
    name: str
    placement: Placement
    mean: torch.Tensor  # (C, h, w) fp32, CPU
    std: torch.Tensor
    caption: int  # index into LatentCache.texts
    device_time_ids: torch.Tensor | None = None  # set when the cache moves to the accelerator

    @property
    def time_ids(self) -> torch.Tensor:
        if self.device_time_ids is not None:
            return self.device_time_ids
        p = self.placement
        return torch.tensor(
            [*p.original_size, *p.crop_top_left, p.bucket[1], p.bucket[0]], dtype=torch.float32
        )


@dataclass
class LatentCache:
    items: list[CachedItem]
    texts: list[dict[str, torch.Tensor]]  # per distinct caption
    captions: list[str]
    empty_text: dict[str, torch.Tensor]
    validation: list[tuple[str, dict[str, torch.Tensor]]] = field(default_factory=list)

    def nbytes(self) -> int:
        tensors = [t for it in self.items for t in (it.mean, it.std)]
        tensors += [t for d in self.texts + [self.empty_text] for t in d.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device, text_dtype: torch.dtype) -> LatentCache:
        """Move the cached tensors (text in ``text_dtype``) so steps read them without host copies."""
        for it in self.items:
            it.mean, it.std = it.mean.to(device), it.std.to(device)
            it.device_time_ids = it.time_ids.to(device)
        self.texts = [{k: _to_device(v, device, text_dtype) for k, v in d.items()} for d in self.texts]
        self.empty_text = {k: _to_device(v, device, text_dtype) for k, v in self.empty_text.items()}
        return self

    def bucket_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for it in self.items:
            key = f"{it.placement.resolution}px {bucket_key(it.placement.bucket)}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))


def _to_tensor(img) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def build_cache(
    family: Family,
    dataset: StagedDataset,
    resolutions: list[int],
    validation_prompts: list[str],
    device: torch.device,
    max_pixels: int,
    on_item: Callable[[int, int], None] | None = None,
) -> LatentCache:
    multiple = family.pixel_multiple()

    captions = sorted({r.caption for r in dataset.images})
    index = {c: i for i, c in enumerate(captions)}
    prompts = captions + [""] + validation_prompts
    encoded: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(prompts), 16):
        encoded += family.encode_prompts(prompts[start : start + 16], device)
    texts, empty, val = encoded[: len(captions)], encoded[len(captions)], encoded[len(captions) + 1 :]

    plan = [(rec, p) for rec in dataset.images for p in place(rec.width, rec.height, resolutions, multiple)]
    items: list[CachedItem] = []
    for i, (rec, p) in enumerate(plan):
        assert p.bucket[0] % multiple == 0 and p.bucket[1] % multiple == 0, (p.bucket, multiple)
        img = resize_and_crop(load_rgb(rec.path, max_pixels), p)
        mean, std = family.encode_images(_to_tensor(img)[None].to(device))
        items.append(CachedItem(rec.name, p, mean[0].cpu(), std[0].cpu(), index[rec.caption]))
        if on_item:
            on_item(i + 1, len(plan))
    return LatentCache(items, texts, captions, empty, list(zip(validation_prompts, val, strict=True)))


class BatchSampler:
    """Deterministic global batches of one bucket each, reshuffled every epoch from (seed, epoch).

    Every batch holds exactly ``batch_size`` items (a bucket's last, short batch is topped up
    with items of the same bucket), so data-parallel processes can split it evenly. The
    position (epoch, index) is all that is needed to continue the same order later.
    """

    def __init__(self, cache: LatentCache, batch_size: int, seed: int):
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(self.cache.items):
            groups.setdefault((it.placement.resolution, it.placement.bucket), []).append(i)
        batches = []
        for key in sorted(groups):
            idx = groups[key]
            rng.shuffle(idx)
            for j in range(0, len(idx), self.batch_size):
                batch = idx[j : j + self.batch_size]
                fill = 0
                while len(batch) < self.batch_size:  # top up from the same bucket, cycling
                    batch.append(idx[fill % len(idx)])
                    fill += 1
                batches.append(batch)
        rng.shuffle(batches)
        return batches

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._epoch_order(self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        batch = self._order[self.index]
        self.index += 1
        return batch


def collate(
    cache: LatentCache,
    indices: list[int],
    drop: list[bool],
    device: torch.device,
    text_dtype: torch.dtype,
    rng: BatchRandom,
) -> Batch:
    """Stack cached items into a Batch; ``drop[i]`` swaps item i's caption for the empty one."""
    items = [cache.items[i] for i in indices]
    texts = [cache.empty_text if d else cache.texts[it.caption] for it, d in zip(items, drop, strict=True)]
    text = {k: _to_device(torch.stack([t[k] for t in texts]), device, text_dtype) for k in texts[0]}
    return Batch(
        latent_mean=_to_device(torch.stack([it.mean for it in items]), device),
        latent_std=_to_device(torch.stack([it.std for it in items]), device),
        text=text,
        time_ids=_to_device(torch.stack([it.time_ids for it in items]), device),
        rng=rng,
    )


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host -> GPU through pinned memory, asynchronously: a plain copy from pageable memory would
    make the host wait for every GPU kernel queued before it (a sync per step)."""
    if dtype is not None and not t.is_floating_point():
        dtype = None  # attention masks and token ids keep their own dtype
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, dtype, non_blocking=True)
    return t.to(device, dtype)
