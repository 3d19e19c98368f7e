"""Autocaption: captions written by a vision-language model in the container, before caching.

``autocaption.mode``: ``off``; ``missing`` captions the images that have no caption of their own
(no ``.txt``, no table row: they would get ``dataset.default_caption``), never touching one the user
wrote; ``all`` captions every image. The captioner is resolved like base weights (a folder, a name
under ``weights/``, or a Hub id) and must be a Qwen2-VL / Qwen2.5-VL chat model (the default,
``Qwen/Qwen2.5-VL-7B-Instruct``, docs/spec.md). Each caption is ``prefix + text + suffix``, then the
trigger word is added as it is to written captions.

It runs on the main process before the text encoders and the denoiser load, in batches, with
progress lines (phase ``caption``). The captions go to ``OUT/captions/<image path>.txt`` (the dataset's
own layout, so they can be copied beside the images and edited) and ``dataset_report.json`` (source
``autocaption``); the other processes read them from there. The captioner is released (and the GPU
cache emptied) before anything else loads.

The processor is built from the captioner's folder without its video part (``TinyQwen2VLProcessor``,
the same ``Qwen2VLProcessor`` placeholder expansion): transformers 5 builds a Qwen2-VL processor only
with a video processor, which needs torchvision, and captioning reads still images only.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import progress
from .spec import DEFAULT_CAPTIONER

__all__ = ["DEFAULT_CAPTIONER", "Captioner", "apply_autocaption", "caption_file", "write_tiny_captioner"]
CAPTION_FOLDER = "captions"
# the image's longest side the captioner reads at most: ~1 MP is what Qwen2.5-VL's own examples
# caption at (1024 visual tokens); more costs time for no better caption
MAX_PIXELS = 1024 * 28 * 28
_SYSTEM = "You are a helpful assistant."


def chat_prompt(question: str) -> str:
    """One image and ``question`` in Qwen2-VL's chat format, the assistant's turn open (what its chat
    template writes for a user message of an image and a text)."""
    return (
        f"<|im_start|>system\n{_SYSTEM}<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    )


class Captioner:
    """A Qwen2-VL-family chat model that captions images, greedy (the same image, the same caption)."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForImageTextToText, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from .models.qwen_image_edit.tiny import TinyQwen2VLProcessor

        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.padding_side = "left"  # a batch's prompts end where generation starts
        size: Any = Qwen2VLImageProcessorPil.from_pretrained(folder).size  # pixel bounds, as "edges"
        cap = {
            "shortest_edge": size.shortest_edge,
            "longest_edge": min(size.longest_edge or MAX_PIXELS, MAX_PIXELS),
        }
        images = Qwen2VLImageProcessorPil.from_pretrained(folder, size=cap)
        self.processor: Any = TinyQwen2VLProcessor(image_processor=images, tokenizer=tokenizer)
        model: Any = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
        self.model: Any = model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def caption(self, images: list[Image.Image], question: str, max_new_tokens: int) -> list[str]:
        inputs = self.processor(
            text=[chat_prompt(question)] * len(images), images=images, padding=True, return_tensors="pt"
        ).to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [" ".join(t.split()) for t in self.processor.batch_decode(new, skip_special_tokens=True)]


def caption_images(
    captioner: Captioner,
    paths: list[Path],
    question: str,
    max_new_tokens: int,
    batch_size: int,
    load: Callable[[Path], Image.Image],
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    """The captions of ``paths`` in order, ``batch_size`` images at a time (only those in memory)."""
    out: list[str] = []
    for start in range(0, len(paths), batch_size):
        out += captioner.caption(
            [load(p) for p in paths[start : start + batch_size]], question, max_new_tokens
        )
        if on_batch:
            on_batch(len(out), len(paths))
    return out


def release(captioner: Captioner) -> None:
    """The captioner's weights off the device and out of memory."""
    captioner.model.to("cpu")
    captioner.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def caption_file(out_dir: Path, name: str) -> Path:
    """Where image ``name``'s caption goes: ``captions/`` in the dataset's own layout, ``.txt``."""
    return out_dir / CAPTION_FOLDER / Path(name).with_suffix(".txt")


def write_tiny_captioner(folder: Path) -> Path:
    """A tiny random captioner of the default's class (``Qwen2_5_VLForConditionalGeneration``, the tiny
    Qwen-Image-Edit text encoder, its tokenizer and image processor), as a plain model folder."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .models.qwen_image_edit.tiny import (
        MAX_PIXELS as TINY_MAX,
    )
    from .models.qwen_image_edit.tiny import (
        MIN_PIXELS,
        vl_text_encoder,
        write_edit_tokenizer,
    )

    folder = Path(folder)
    tok = write_edit_tokenizer(folder)
    torch.manual_seed(5)
    vl_text_encoder(tok).save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=TINY_MAX).save_pretrained(folder)
    return folder


def apply_autocaption(ctx: Any, dataset: Any) -> Any:
    """``dataset`` (a ``StagedDataset``) with the captions ``ctx.spec.autocaption`` asks for written by the
    captioner (main process; the others read the files it wrote). ``ctx`` is the run's ``RunContext``."""
    from dataclasses import replace

    opts = ctx.spec.autocaption
    if opts.mode == "off":
        return dataset
    chosen = [r for r in dataset.images if opts.mode == "all" or r.caption_source == "default"]
    if not chosen:
        if ctx.main:
            progress.emit("autocaption: every image has a caption of its own; nothing to caption")
        return dataset
    if ctx.main:
        with ctx.phase("autocaption"):
            _caption_and_save(ctx, chosen)
    ctx.accelerator.wait_for_everyone()
    captions = {r.name: caption_file(ctx.out_dir, r.name).read_text(encoding="utf-8").strip() for r in chosen}
    images = [
        replace(r, caption=captions[r.name], caption_source="autocaption") if r.name in captions else r
        for r in dataset.images
    ]
    return replace(dataset, images=images)


def _caption_and_save(ctx: Any, chosen: list[Any]) -> None:
    """Caption ``chosen`` (image records), write ``captions/``, release the captioner."""
    import time

    from .data import add_trigger_word, load_rgb
    from .trainer import TrainingError
    from .weights import WeightsError, resolve_model_folder

    spec = ctx.spec
    opts = spec.autocaption
    progress.emit(progress.format_progress("caption", 0, len(chosen)))
    try:
        folder = resolve_model_folder(opts.captioner, "autocaption.captioner")
    except WeightsError as exc:
        raise TrainingError(str(exc)) from None
    started = time.perf_counter()
    try:
        captioner = Captioner(folder, ctx.device, ctx.weight_dtype)
    except Exception as exc:  # not a Qwen2-VL-family folder, a damaged file
        why = " ".join(str(exc).split())[:300]
        raise TrainingError(
            f"autocaption.captioner: cannot load {folder} as a Qwen2-VL / Qwen2.5-VL chat model "
            f"({type(exc).__name__}: {why})"
        ) from None
    loaded = time.perf_counter() - started
    limit = spec.dataset.max_image_pixels
    try:
        texts = caption_images(
            captioner,
            [r.path for r in chosen],
            opts.prompt,
            opts.max_new_tokens,
            opts.batch_size,
            lambda p: load_rgb(p, limit),
            lambda done, n: progress.emit(progress.format_progress("caption", done, n)),
        )
    finally:
        release(captioner)
    empty = 0
    for record, text in zip(chosen, texts, strict=True):
        empty += not text
        caption = " ".join(part for part in (opts.prefix.strip(), text, opts.suffix.strip()) if part)
        caption = add_trigger_word(caption, spec.trigger_word, spec.dataset.trigger_word_position)
        path = caption_file(ctx.out_dir, record.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(caption + "\n", encoding="utf-8")
    took = time.perf_counter() - started - loaded
    progress.emit(
        f"autocaption: {len(chosen)} image(s) captioned by {opts.captioner} in {took:.1f} s "
        f"({took / len(chosen):.2f} s an image; loading it {loaded:.1f} s); captions in "
        f"{ctx.out_dir / CAPTION_FOLDER}"
        + (
            f"; {empty} caption(s) came back empty (the prefix, suffix and trigger word only)"
            if empty
            else ""
        )
    )
