"""Aspect-ratio buckets (train/buckets.py): shapes the model can take, images placed and cropped well."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from train.buckets import (
    MAX_ASPECT,
    MAX_UPSCALE,
    Placement,
    bucket_key,
    bucket_step,
    make_buckets,
    nearest_bucket,
    place,
    resize_and_crop,
)

RESOLUTIONS = (64, 256, 512, 1024)
MULTIPLES = (8, 16, 32, 64)


@pytest.mark.parametrize("multiple", MULTIPLES)
@pytest.mark.parametrize("res", RESOLUTIONS)
def test_every_bucket_fits_the_model_and_the_budget(res, multiple):
    buckets = make_buckets(res, multiple)
    assert buckets == sorted(set(buckets))
    if res >= 4 * max(multiple, bucket_step(res)):
        assert len(buckets) >= 3  # room for landscape, square and portrait
    for w, h in buckets:
        assert w % multiple == 0 and h % multiple == 0, (w, h)
        assert w % bucket_step(res) == 0 and h % bucket_step(res) == 0, (w, h)
        assert 1 / MAX_ASPECT <= w / h <= MAX_ASPECT, (w, h)
        assert w * h <= res * res, (w, h)
        assert w * h >= res * res // 2, (w, h)  # no bucket wastes most of the pixel budget
    square = [b for b in buckets if b[0] == b[1]]
    assert len(square) == 1 and square[0][0] ** 2 <= res * res
    assert square[0] == (res, res)  # these resolutions are multiples of every step


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_buckets_reach_both_extreme_aspects(res):
    ratios = [w / h for w, h in make_buckets(res, 16)]
    assert max(ratios) == pytest.approx(MAX_ASPECT) and min(ratios) == pytest.approx(1 / MAX_ASPECT)


@pytest.mark.parametrize("multiple", MULTIPLES)
@pytest.mark.parametrize("res", RESOLUTIONS)
def test_portrait_and_landscape_get_the_same_choice(res, multiple):
    """Every landscape bucket has its portrait twin, so portrait photos are fitted as well as landscape ones."""
    buckets = make_buckets(res, multiple)
    assert {(h, w) for w, h in buckets} == set(buckets)
    for w, h in [(300, 100), (280, 100), (250, 100), (160, 100), (130, 100), (400, 100)]:
        lw, lh = nearest_bucket(w, h, buckets)
        assert nearest_bucket(h, w, buckets) == (lh, lw)


def test_multiple_that_is_not_a_power_of_two():
    for res in RESOLUTIONS:
        for w, h in make_buckets(res, 48):
            assert w % 48 == 0 and h % 48 == 0 and w % bucket_step(res) == 0 and h % bucket_step(res) == 0
            assert w * h <= res * res and 1 / MAX_ASPECT <= w / h <= MAX_ASPECT


def test_bucket_step():
    assert [bucket_step(r) for r in (64, 128, 255, 256, 511, 512, 1024, 2048)] == [
        16,
        16,
        16,
        32,
        32,
        64,
        64,
        64,
    ]


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_nearest_bucket_follows_the_image_shape(res):
    buckets = make_buckets(res, 16)
    assert nearest_bucket(500, 500, buckets) == (res, res)
    assert nearest_bucket(3, 3, buckets) == (res, res)

    w, h = nearest_bucket(1600, 900, buckets)
    assert w > h
    # the closest aspect ratio on offer, in log space
    best = min(abs(math.log(bw / bh) - math.log(16 / 9)) for bw, bh in buckets)
    assert abs(math.log(w / h) - math.log(16 / 9)) == pytest.approx(best)

    w, h = nearest_bucket(900, 1600, buckets)
    assert h > w
    assert nearest_bucket(10_000, 100, buckets)[0] / nearest_bucket(10_000, 100, buckets)[1] == pytest.approx(
        4
    )


def test_place_and_crop_give_exact_centred_bucket():
    # left half black, right half white: a centred crop keeps the edge in the middle
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 100:] = 255
    img = Image.fromarray(arr)

    [p] = place(200, 100, [64], multiple=16)
    assert isinstance(p, Placement) and p.resolution == 64
    bw, bh = p.bucket
    assert bw > bh and bw % 16 == 0 and bh % 16 == 0
    assert p.original_size == (100, 200)  # (height, width)

    out = resize_and_crop(img, p)
    assert out.size == p.bucket
    # the resized image is cropped equally on both sides
    scale = max(bw / 200, bh / 100)
    new_w, new_h = round(200 * scale), round(100 * scale)
    assert p.crop_top_left == ((new_h - bh) // 2, (new_w - bw) // 2)
    left, right = p.crop_top_left[1], new_w - bw - p.crop_top_left[1]
    assert abs(left - right) <= 1
    got = np.asarray(out).astype(int)
    mid = bw // 2
    assert got[:, : mid - 2].max() < 30 and got[:, mid + 2 :].min() > 225


@pytest.mark.parametrize("size", [(200, 100), (100, 200), (123, 77), (64, 64), (1000, 50), (17, 900)])
@pytest.mark.parametrize("res, multiple", [(64, 16), (256, 8), (512, 16), (1024, 64)])
def test_resize_and_crop_always_gives_the_bucket_size(size, res, multiple):
    img = Image.new("RGB", size, (120, 60, 30))
    for p in place(size[0], size[1], [res], multiple):
        out = resize_and_crop(img, p)
        assert out.size == p.bucket
        top, left = p.crop_top_left
        assert top >= 0 and left >= 0
        assert (np.asarray(out) == (120, 60, 30)).all()  # a crop never reaches past the image


def test_small_image_is_only_placed_at_the_smallest_resolution():
    # 100x100 would need 10x to reach 1024 (and 5x for 512): only the smallest resolution takes it
    placements = place(100, 100, [1024, 512, 256])
    assert [p.resolution for p in placements] == [256]
    assert place(20, 20, [512, 1024])[0].resolution == 512  # even far too small: the smallest one

    # large enough for every resolution within MAX_UPSCALE
    assert [p.resolution for p in place(600, 600, [512, 1024])] == [512, 1024]
    # exactly at the limit still counts; just over it does not
    assert [p.resolution for p in place(512, 512, [256, 1024])] == [256, 1024]
    assert 1024 / 511 > MAX_UPSCALE
    assert [p.resolution for p in place(511, 511, [256, 1024])] == [256]


def test_placements_follow_resolution_order():
    ps = place(2000, 1000, [1024, 64, 512])
    assert [p.resolution for p in ps] == [64, 512, 1024]
    for p in ps:
        assert p.bucket in make_buckets(p.resolution, 16)
        assert p.bucket[0] > p.bucket[1]


def test_bucket_key():
    assert bucket_key((512, 768)) == "512x768"
