"""Edit models around the training loop: which pairs a model takes, the validation control images,
and the side-by-side samples (docs/edit.md).

An edit model (FLUX.1 Kontext, Qwen-Image-Edit) trains on before/after pairs: a target image, its
control image(s) and an instruction; Flux.2 may take reference images too. The dataset contract
(``NAME_control.ext``, ``control/NAME.ext``, ``metadata.jsonl`` ``control_file_name``) is
``train/dataset_rules.py``'s; the control latents are cached by ``train/cache.py``; the maths is the
family's. Here: the glue the loop needs.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .cache import ControlSet
from .clips import decode_frames
from .data import ControlRecord, ImageRecord, StagedDataset, load_rgb
from .dataset_rules import PairRule
from .families import model_info
from .spec import TrainingSpec

DEFAULT_CONTROL_SETS = 2  # validation renders each prompt on this many control sets by default
GAP = 4  # pixels of white between the panels of a side-by-side sample


class ValidationControlError(ValueError):
    """A ``validation.control_images`` name the dataset does not hold."""


def pair_rule(spec: TrainingSpec) -> PairRule:
    """What the staging expects of the dataset for ``spec.model`` (pairs, how many controls)."""
    return PairRule.of(spec.model, model_info(spec.model))


def validation_control_sets(
    spec: TrainingSpec, train: StagedDataset, held: StagedDataset | None
) -> list[ControlSet]:
    """The control images each validation prompt is rendered on ([] for an unpaired set).

    Named by ``validation.control_images`` (a target's name takes its controls, a control file's
    name that image alone), else: the controls without a target (never trained on), else the
    held-out pairs' controls, else the first pair's; at most ``DEFAULT_CONTROL_SETS`` by default.
    """
    if model_info(spec.model).image_to_video:
        return first_frame_sets(spec, train, held)
    pairs = [r for ds in (held, train) if ds is not None for r in ds.images if r.controls]
    if not pairs and not train.loose_controls:
        return []
    max_pixels = spec.dataset.max_image_pixels
    names = spec.validation.control_images
    if names:
        return [_named_set(name, pairs, train.loose_controls, max_pixels) for name in names]
    loose = [ControlSet(c.name, (load_rgb(c.path, max_pixels),)) for c in train.loose_controls]
    held_pairs = [r for r in held.images if r.controls] if held is not None else []
    chosen = held_pairs or [r for r in train.images if r.controls][:1]
    sets = loose + [_record_set(r.name, r.controls, max_pixels) for r in chosen]
    return sets[:DEFAULT_CONTROL_SETS]


def first_frame_sets(
    spec: TrainingSpec, train: StagedDataset, held: StagedDataset | None
) -> list[ControlSet]:
    """An image-to-video model's validation input images: the first frames of the samples named by
    ``validation.control_images``, else of the held-out samples, else of the first training clip
    (at most ``DEFAULT_CONTROL_SETS`` by default) -- what a user animates with the trained LoRA."""
    max_pixels = spec.dataset.max_image_pixels
    records = [r for ds in (held, train) if ds is not None for r in ds.images]
    names = spec.validation.control_images
    if names:
        chosen = [_named_record(name, records) for name in names]
    else:
        clips = [r for r in train.images if r.clip is not None]
        chosen = (list(held.images) if held is not None else [])[:DEFAULT_CONTROL_SETS] or (
            clips or train.images
        )[:1]
    return [ControlSet(r.name, (_first_frame(r, max_pixels),)) for r in chosen]


def _first_frame(rec: ImageRecord, max_pixels: int) -> Image.Image:
    if rec.clip is None:
        return load_rgb(rec.path, max_pixels)
    return decode_frames(rec.path, rec.clip, [0], max_pixels)[0]


def _named_record(name: str, records: list[ImageRecord]) -> ImageRecord:
    want = name.replace("\\", "/").strip("/")
    for r in records:
        if want in (r.name, str(PurePosixPath(r.name).with_suffix(""))):
            return r
    raise ValidationControlError(
        f"validation.control_images: {name!r} is not a clip or image of the dataset "
        f"(for example: {', '.join(r.name for r in records[:5]) or 'none'})"
    )


def _record_set(name: str, controls: tuple[ControlRecord, ...], max_pixels: int) -> ControlSet:
    return ControlSet(name, tuple(load_rgb(c.path, max_pixels) for c in controls))


def _named_set(name: str, pairs: list, loose: list[ControlRecord], max_pixels: int) -> ControlSet:
    """The control set a ``validation.control_images`` entry names (with or without extension)."""
    want = name.replace("\\", "/").strip("/")

    def same(dataset_name: str) -> bool:
        return want in (dataset_name, str(PurePosixPath(dataset_name).with_suffix("")))

    for r in pairs:
        if same(r.name):
            return _record_set(r.name, r.controls, max_pixels)
    for c in [c for r in pairs for c in r.controls] + list(loose):
        if same(c.name):
            return _record_set(c.name, (c,), max_pixels)
    known = [r.name for r in pairs[:5]] + [c.name for c in loose[:5]]
    raise ValidationControlError(
        f"validation.control_images: {name!r} is neither a target nor a control image of the dataset "
        f"(for example: {', '.join(known) or 'none'})"
    )


RESULT_BOX = "result_box"  # PNG text chunk of a side-by-side sample: where the result panel is


def side_by_side(images: list[Image.Image]) -> Image.Image:
    """The images in a row (controls, then the result), each scaled to the last one's height; the
    result panel's box is kept in ``info[RESULT_BOX]`` (``save_sample`` writes it into the PNG)."""
    height = images[-1].height
    scaled = [
        im if im.height == height else im.resize((max(1, round(im.width * height / im.height)), height))
        for im in images
    ]
    width = sum(im.width for im in scaled) + GAP * (len(scaled) - 1)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for im in scaled:
        sheet.paste(im.convert("RGB"), (x, 0))
        x += im.width + GAP
    left = width - scaled[-1].width
    sheet.info[RESULT_BOX] = f"{left},0,{width},{height}"
    return sheet


def save_sample(img: Image.Image, path: Path) -> None:
    """Write a validation sample as PNG, with its result panel's box when it is a side-by-side one."""
    info = None
    if RESULT_BOX in img.info:
        info = PngInfo()
        info.add_text(RESULT_BOX, img.info[RESULT_BOX])
    img.save(path, format="PNG", pnginfo=info)


def result_panel(img: Image.Image) -> Image.Image:
    """The result of a validation sample: the right-hand panel of a side-by-side one, else itself
    (what the render scores compare with the training images and the prompt)."""
    box = img.info.get(RESULT_BOX)
    if not box:
        return img
    x0, y0, x1, y1 = (int(v) for v in str(box).split(","))
    return img.crop((x0, y0, x1, y1))
