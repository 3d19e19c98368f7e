"""Latents and text embeddings, computed once before training.

Every (image, resolution) placement is encoded by the VAE once; its posterior mean and std
are kept so each step samples a fresh latent (as encoding anew would) without the VAE.
Every distinct caption, the empty caption (for caption dropout) and the validation prompts
are encoded once. After this the VAE and text encoders can leave the accelerator.

Edit models (docs/edit.md): each item's control images are encoded once too, each resized into
its own aspect bucket at the item's resolution (as the edit pipelines resize their input image to
a fixed area at its own aspect ratio), kept as ``Family.encode_controls`` returns them. Where the
text encoder reads the control images (Qwen-Image-Edit), every item keeps its own caption and
empty-caption embeddings, and every validation prompt is encoded with each validation control.

Video models (docs/video.md): a clip's sample is its frames (``clips.pick_frames``), each resized and
cropped into the clip's bucket like an image, encoded together as (3, F, H, W); an image is a
one-frame sample. Items of a batch share resolution, bucket and frame count. ``random`` sampling
caches ``windows`` windows per clip, drawn from the seed, and each epoch trains the next one. An
image-to-video model's item also keeps what its sample's first frame conditions it on
(``Family.encode_conditions``), as its controls.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from . import clips as cliplib
from .buckets import Placement, bucket_key, place, resize_and_crop
from .data import DatasetError, ImageRecord, StagedDataset, load_mask, load_rgb
from .dataset_rules import VideoRule
from .models.base import Batch, BatchRandom, Family


@dataclass
class CachedItem:
    name: str
    placement: Placement
    mean: torch.Tensor  # (C, h, w) fp32, CPU; a video model's: (C, f, h, w)
    std: torch.Tensor
    caption: int  # index into LatentCache.texts
    device_time_ids: torch.Tensor | None = None  # set when the cache moves to the accelerator
    controls: list[torch.Tensor] = field(default_factory=list)  # (C, h_k, w_k) per control image
    # the item's own caption / empty-caption embeddings, where the text encoder reads the controls
    text: dict[str, torch.Tensor] | None = None
    empty: dict[str, torch.Tensor] | None = None
    frames: int = 0  # a video model's sample: its frame count (1 for an image); 0 for an image model
    window: int = 0  # which of its clip's ``windows`` cached windows this is (random sampling)
    windows: int = 1
    # its loss mask at latent resolution, (1, h, w) or (1, 1, h, w) beside a video model's latents, in
    # [0, 1]: the weight of each latent pixel in the loss; None learns everywhere
    mask: torch.Tensor | None = None

    @property
    def shape_key(self) -> tuple:
        """What must be equal across a batch: resolution, bucket, frames and the control latents' shapes."""
        p = self.placement
        return (p.resolution, p.bucket, self.frames, tuple(tuple(c.shape) for c in self.controls))

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
    # (prompt, its embeddings) per validation render: each prompt, or for an edit model each
    # prompt on each validation control set (``validation_controls``, in the same order)
    validation: list[tuple[str, dict[str, torch.Tensor]]] = field(default_factory=list)
    validation_controls: list[ControlSet] = field(default_factory=list)
    # output preservation: per distinct caption, its preservation prompt's embeddings (None: off)
    preserve_texts: list[dict[str, torch.Tensor]] | None = None

    def _texts(self) -> list[dict[str, torch.Tensor]]:
        per_item = [d for it in self.items for d in (it.text, it.empty) if d is not None]
        return self.texts + [self.empty_text] + per_item + (self.preserve_texts or [])

    def nbytes(self) -> int:
        tensors = [t for it in self.items for t in (it.mean, it.std, *it.controls, *_present(it.mask))]
        tensors += [t for d in self._texts() for t in d.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device, text_dtype: torch.dtype) -> LatentCache:
        """Move the cached tensors (text in ``text_dtype``) so steps read them without host copies."""

        def move(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: _to_device(v, device, text_dtype) for k, v in d.items()}

        for it in self.items:
            it.mean, it.std = it.mean.to(device), it.std.to(device)
            it.mask = it.mask.to(device) if it.mask is not None else None
            it.controls = [c.to(device) for c in it.controls]
            it.device_time_ids = it.time_ids.to(device)
            it.text = move(it.text) if it.text is not None else None
            it.empty = move(it.empty) if it.empty is not None else None
        self.texts = [move(d) for d in self.texts]
        self.empty_text = move(self.empty_text)
        if self.preserve_texts is not None:
            self.preserve_texts = [move(d) for d in self.preserve_texts]
        return self

    def bucket_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for it in self.items:
            if it.window:
                continue  # a clip's other cached windows: one sample
            frames = f" x {it.frames} frames" if it.frames else ""
            key = f"{it.placement.resolution}px {bucket_key(it.placement.bucket)}{frames}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))


@dataclass(frozen=True)
class ControlSet:
    """The control images of one validation render, as the user gave them (PIL RGB)."""

    name: str  # for file names and the log: the target's or the control file's dataset name
    images: tuple[Image.Image, ...]


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
    validation_controls: list[ControlSet] | None = None,
    *,
    video: VideoRule | None = None,
    seed: int = 0,
    preserve: Callable[[str], str] | None = None,
) -> LatentCache:
    """``preserve``: a caption's preservation prompt (output preservation), embedded per caption too."""
    multiple = family.pixel_multiple()
    controls = validation_controls or []

    captions = sorted({r.caption for r in dataset.images})
    index = {c: i for i, c in enumerate(captions)}
    # A text encoder that reads the controls has no text without its image: every item caches its
    # own (``_cache_controls``) and the validation prompts are read with each control set.
    prompts = [] if family.text_reads_controls else captions + [""] + validation_prompts
    encoded: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(prompts), 16):
        encoded += family.encode_prompts(prompts[start : start + 16], device)
    texts, empty = encoded[: len(captions)], (encoded[len(captions)] if encoded else {})
    validation = _validation_texts(family, validation_prompts, controls, encoded[len(captions) + 1 :], device)

    plan = [
        (rec, p, w)
        for rec in dataset.images
        for p in place(rec.width, rec.height, resolutions, multiple)
        for w in range(_windows(rec, video))
    ]
    items: list[CachedItem] = []
    for i, (rec, p, w) in enumerate(plan):
        assert p.bucket[0] % multiple == 0 and p.bucket[1] % multiple == 0, (p.bucket, multiple)
        conditions: list[torch.Tensor] = []
        if rec.frames:  # a video model's sample: (1, 3, F, H, W)
            frames = [resize_and_crop(f, p) for f in _sample_frames(rec, video, seed, w, max_pixels)]
            pixels = torch.stack([_to_tensor(f) for f in frames], dim=1)[None]
            # an image-to-video model's condition: the sample's own first frame
            conditions = [c[0].cpu() for c in family.encode_conditions(frames, pixels.to(device))]
        else:
            pixels = _to_tensor(resize_and_crop(load_rgb(rec.path, max_pixels), p))[None]
        mean, std = family.encode_images(pixels.to(device))
        item = CachedItem(
            rec.name,
            p,
            mean[0].cpu(),
            std[0].cpu(),
            index[rec.caption],
            frames=rec.frames,
            window=w,
            windows=_windows(rec, video),
        )
        item.controls = conditions
        if rec.mask is not None:
            item.mask = _latent_mask(rec, p, max_pixels, item.mean)
        if rec.controls:
            _cache_controls(family, item, rec, multiple, max_pixels, device)
        items.append(item)
        if on_item:
            on_item(i + 1, len(plan))
    cache = LatentCache(
        items, texts, captions, empty, validation, [c for c in controls for _ in validation_prompts]
    )
    if preserve is not None:
        swapped = [preserve(c) for c in captions]
        cache.preserve_texts = [
            e for i in range(0, len(swapped), 16) for e in family.encode_prompts(swapped[i : i + 16], device)
        ]
    return cache


def _latent_mask(rec: ImageRecord, p: Placement, max_pixels: int, latents: torch.Tensor) -> torch.Tensor:
    """The record's loss mask placed exactly as its image (resized to the image's size, then the same
    resize and crop into the bucket), averaged down to the latent grid: each latent pixel weighs as the
    share of white over the pixels it covers."""
    assert rec.mask is not None
    mask = load_mask(rec.mask, max_pixels)
    if mask.size != (rec.width, rec.height):
        mask = mask.resize((rec.width, rec.height), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resize_and_crop(mask, p), dtype=np.float32) / 255.0)
    grid = tuple(latents.shape[-2:])
    small = torch.nn.functional.interpolate(pixels[None, None], size=grid, mode="area")[0]  # (1, h, w)
    return small.clamp(0, 1).reshape(1, *([1] * (latents.dim() - 3)), *grid)


def _present(t: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return () if t is None else (t,)


def _windows(rec: ImageRecord, video: VideoRule | None) -> int:
    """Cached windows of a record: ``video.windows`` for a clip under random sampling, else one."""
    return video.windows if video is not None and rec.clip is not None else 1


def _sample_frames(
    rec: ImageRecord, video: VideoRule | None, seed: int, window: int, max_pixels: int
) -> Sequence:
    """The frames of one sample of ``rec`` (PIL, as shown): an image's one frame, or a clip's as
    ``video.sampling`` draws them (window ``window`` of a random draw, from the seed and the name)."""
    if rec.clip is None:
        return [load_rgb(rec.path, max_pixels)]
    assert video is not None, "a clip is staged for a video model only"
    draw = random.Random(f"{seed}:{rec.name}:{window}")
    indices = cliplib.pick_frames(rec.clip, rec.frames, video.fps, video.sampling, draw)
    try:
        return cliplib.decode_frames(rec.path, rec.clip, indices, max_pixels)
    except cliplib.ClipError as exc:
        raise DatasetError(f"clip {rec.name!r}: {exc}") from None


def _validation_texts(
    family: Family,
    prompts: list[str],
    controls: list[ControlSet],
    encoded: list[dict[str, torch.Tensor]],
    device: torch.device,
) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(prompt, embeddings) per validation render: each prompt, or each prompt on each control set
    (control-major), read with its control images where the text encoder reads them."""
    if not controls:  # (none for an edit model's held-out cache, which renders nothing)
        return list(zip(prompts, encoded, strict=True)) if encoded else []
    if not family.text_reads_controls:
        return [pair for _ in controls for pair in zip(prompts, encoded, strict=True)]
    out = []
    for c in controls:
        texts = family.encode_prompts_with_controls(
            prompts, [list(c.images)] * len(prompts), device, for_render=True
        )
        out += list(zip(prompts, texts, strict=True))
    return out


def _cache_controls(
    family: Family, item: CachedItem, rec: ImageRecord, multiple: int, max_pixels: int, device: torch.device
) -> None:
    """The item's control latents, each control in its own aspect bucket at the item's resolution;
    and its texts read with those images where the text encoder reads them."""
    resolution = item.placement.resolution
    images = []
    for c in rec.controls:
        cp = place(c.width, c.height, [resolution], multiple)[0]
        images.append(resize_and_crop(load_rgb(c.path, max_pixels), cp))
    item.controls = [family.encode_controls(_to_tensor(im)[None].to(device))[0].cpu() for im in images]
    if family.text_reads_controls:
        item.text, item.empty = family.encode_prompts_with_controls(
            [rec.caption, ""], [images, images], device, for_render=False
        )


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
            if it.window == epoch % it.windows:  # a clip's cached windows take turns, one an epoch
                groups.setdefault(it.shape_key, []).append(i)
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
    text = _batched([_item_text(cache, it, d) for it, d in zip(items, drop, strict=True)], device, text_dtype)
    return Batch(
        latent_mean=_to_device(torch.stack([it.mean for it in items]), device),
        latent_std=_to_device(torch.stack([it.std for it in items]), device),
        text=text,
        time_ids=_to_device(torch.stack([it.time_ids for it in items]), device),
        rng=rng,
        controls=[
            _to_device(torch.stack([it.controls[k] for it in items]), device)
            for k in range(len(items[0].controls))
        ],
        loss_weights=_loss_weights(items, device),
        preserve_text=None
        if cache.preserve_texts is None
        else _batched([cache.preserve_texts[it.caption] for it in items], device, text_dtype),
    )


def _loss_weights(items: list[CachedItem], device: torch.device) -> torch.Tensor | None:
    """(B, 1, ...) per-latent-pixel loss weights when any item of the batch has a mask, else None."""
    if all(it.mask is None for it in items):
        return None
    shape = (1, *items[0].mean.shape[1:])
    rows = [it.mask if it.mask is not None else torch.ones(shape, device=it.mean.device) for it in items]
    return _to_device(torch.stack(rows), device)


def _batched(
    texts: list[dict[str, torch.Tensor]], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    return {k: _to_device(_stack_rows([t[k] for t in texts]), device, dtype) for k in texts[0]}


def _stack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stacked along a new batch axis; tensors cached with different lengths (a family that keeps only
    a prompt's own tokens, Wan) are zero-padded to the longest first, which the family pads further."""
    if not tensors[0].dim():
        return torch.stack(tensors)
    longest = max(t.shape[0] for t in tensors)
    if all(t.shape[0] == longest for t in tensors):
        return torch.stack(tensors)
    return torch.stack([torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])]) for t in tensors])


def _item_text(cache: LatentCache, item: CachedItem, drop: bool) -> dict[str, torch.Tensor]:
    """The item's caption embeddings, or the empty caption's when its caption is dropped."""
    if item.text is not None and item.empty is not None:
        return item.empty if drop else item.text
    return cache.empty_text if drop else cache.texts[item.caption]


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host -> GPU through pinned memory, asynchronously: a plain copy from pageable memory would
    make the host wait for every GPU kernel queued before it (a sync per step)."""
    if dtype is not None and not t.is_floating_point():
        dtype = None  # attention masks and token ids keep their own dtype
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, dtype, non_blocking=True)
    return t.to(device, dtype)
