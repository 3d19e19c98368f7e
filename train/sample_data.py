"""A small synthetic captioned image set, made by code (the demo's and the tests' dataset).

    python -m train.sample_data --out examples/sample-dataset
    python -m train.sample_data --pairs --out examples/sample-pairs
    python -m train.sample_data --clips --out examples/sample-clips

Coloured shapes on plain or gradient backgrounds, each with a same-stem ``.txt`` caption
naming the style token ``sks``; or, with ``--pairs``, before/after pairs for edit models: a grey
square (``NAME_control.png``) that the target ``NAME.png`` shows red, with the instruction
"make the square red"; or, with ``--clips``, short H.264 clips (video models) of a shape gliding
across its background. Deterministic: the same files every time.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 70),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ((64, 64), (64, 64), (80, 48), (48, 80), (96, 96), (64, 64), (96, 64), (64, 64))


def draw_example(i: int, size: tuple[int, int]) -> tuple[Image.Image, str]:
    rng = random.Random(1000 + i)
    w, h = size
    fg_name, bg_name = rng.sample(sorted(COLOURS), 2)
    shape = SHAPES[i % len(SHAPES)]
    img = Image.new("RGB", size, COLOURS[bg_name])
    draw = ImageDraw.Draw(img)
    for y in range(h):  # a soft vertical gradient so backgrounds are not flat
        shade = int(40 * y / h)
        base = COLOURS[bg_name]
        draw.line([(0, y), (w, y)], fill=tuple(max(0, c - shade) for c in base))
    r = min(w, h) * rng.uniform(0.25, 0.38)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    draw_shape(draw, shape, cx, cy, r, COLOURS[fg_name])
    return img, f"a {fg_name} {shape} on a {bg_name} background, sks style"


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """A circle, square or triangle of radius ``r`` centred on (``cx``, ``cy``)."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def write_sample_dataset(out: Path, count: int = 8, size: tuple[int, int] | None = None) -> list[Path]:
    """``count`` images (mixed small sizes, or all ``size``) with their captions."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        img, caption = draw_example(i, size or SIZES[i % len(SIZES)])
        path = out / f"shape_{i:02d}.png"
        img.save(path, optimize=True)
        path.with_suffix(".txt").write_text(caption + "\n")
        written.append(path)
    return written


GREY = (128, 128, 128)
PAIR_INSTRUCTION = "make the square red"


def draw_pair(i: int, size: tuple[int, int] = (64, 64)) -> tuple[Image.Image, Image.Image]:
    """(control, target): the same scene with a grey square, then with it red."""
    rng = random.Random(2000 + i)
    w, h = size
    bg = COLOURS[rng.choice(["blue", "green", "yellow", "purple"])]
    r = min(w, h) * rng.uniform(0.2, 0.3)
    cx, cy = w / 2 + rng.uniform(-0.15, 0.15) * w, h / 2 + rng.uniform(-0.15, 0.15) * h
    box = [cx - r, cy - r, cx + r, cy + r]
    images = []
    for fill in (GREY, COLOURS["red"]):
        img = Image.new("RGB", size, bg)
        ImageDraw.Draw(img).rectangle(box, fill=fill)
        images.append(img)
    return images[0], images[1]


def write_pair_dataset(out: Path, count: int = 6, size: tuple[int, int] = (64, 64)) -> list[Path]:
    """``count`` before/after pairs: ``pair_NN.png`` (target), ``pair_NN_control.png`` and the
    instruction in ``pair_NN.txt``; returns the target files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        control, target = draw_pair(i, size)
        path = out / f"pair_{i:02d}.png"
        target.save(path, optimize=True)
        control.save(out / f"pair_{i:02d}_control.png", optimize=True)
        path.with_suffix(".txt").write_text(PAIR_INSTRUCTION + "\n")
        written.append(path)
    return written


def draw_clip(i: int, frames: int = 20, size: tuple[int, int] = (64, 64)) -> tuple[list[Image.Image], str]:
    """The frames of clip ``i`` (a shape that glides from left to right, 16 fps) and its caption."""
    rng = random.Random(3000 + i)
    w, h = size
    fg_name, bg_name = rng.sample(sorted(COLOURS), 2)
    shape = SHAPES[i % len(SHAPES)]
    r = min(w, h) * 0.22
    cy = h / 2 + rng.uniform(-0.15, 0.15) * h
    out = []
    for f in range(frames):
        img = Image.new("RGB", size, COLOURS[bg_name])
        draw = ImageDraw.Draw(img)
        draw_shape(draw, shape, r + (w - 2 * r) * f / max(1, frames - 1), cy, r, COLOURS[fg_name])
        out.append(img)
    return out, f"a {fg_name} {shape} gliding across a {bg_name} background, sks style"


def write_clip_dataset(
    out: Path, count: int = 6, frames: int = 20, size: tuple[int, int] = (64, 64)
) -> list[Path]:
    """``count`` clips ``clip_NN.mp4`` (H.264, 16 fps) with their captions; returns the clips."""
    from .clips import write_clip

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        images, caption = draw_clip(i, frames, size)
        path = write_clip(out / f"clip_{i:02d}.mp4", images, 16.0)
        path.with_suffix(".txt").write_text(caption + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.sample_data", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("examples/sample-dataset"))
    parser.add_argument("--count", type=int, default=None, help="how many (default: 8 images or 6 pairs)")
    parser.add_argument("--pairs", action="store_true", help="before/after pairs for edit models")
    parser.add_argument("--clips", action="store_true", help="short video clips for video models")
    args = parser.parse_args(argv)
    if args.clips:
        written = write_clip_dataset(args.out, args.count or 6)
    elif args.pairs:
        written = write_pair_dataset(args.out, args.count or 6)
    else:
        written = write_sample_dataset(args.out, args.count or 8)
    for p in written:
        print(p)


if __name__ == "__main__":
    main()
