"""Masked loss: a mask per image (NAME_mask.png, or metadata.jsonl's mask_file_name; white learns,
black is ignored, grey weighs) weighs each latent pixel's loss, so the LoRA learns the subject and not
the background. Masks travel through the packer and the staging, and are cached at latent resolution."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import quick_spec, train_quietly
from train.families import MODEL_IDS, model_info
from train.models import family_class

# one model of each image family class that trains without control images: every weight layout
# (packed tokens, patchified tokens, a UNet's latent grid...) is a family class's own
_FAMILIES = {}
for _m in MODEL_IDS:
    _info = model_info(_m)
    if not _info.video and not _info.controls_required:
        _FAMILIES.setdefault(family_class(_m), _m)
LAYOUT_MODELS = sorted(_FAMILIES.values())


@pytest.mark.parametrize("model", LAYOUT_MODELS)
def test_the_loss_ignores_the_masked_half_exactly(model, tiny_weights):
    """The loss's gradient with respect to the latents: nonzero on the white half, exactly zero on the
    black half, through the family's own packing of its latents into tokens."""
    from train.models.base import Batch, BatchRandom
    from train.spec import parse_spec

    base = tiny_weights / model_info(model).tiny_name
    spec = parse_spec({"model": model, "base_weights": str(base), "resolutions": "64"})
    family = family_class(model)(spec, base)
    family.load(torch.float32)
    text = family.encode_prompts(["sks, a red circle"], torch.device("cpu"))[0]
    mean, std = family.encode_images(torch.zeros(1, 3, 64, 64))
    latents = mean.clone().requires_grad_(True)
    half = mean.shape[-1] // 2
    weights = torch.zeros(1, 1, *mean.shape[2:])
    weights[..., :half] = 1.0
    rng = BatchRandom(torch.Generator().manual_seed(0), 1, 0, 1, torch.device("cpu"))
    texts = {k: v[None] for k, v in text.items()}
    batch = Batch(latents, std * 0, texts, torch.zeros(1, 6), rng, loss_weights=weights)

    def denoiser(*args, **kwargs):  # predicts its own input: every output token is its input's token
        first = kwargs.get("hidden_states", args[0] if args else None)
        return (first,)

    family.loss(denoiser, batch).backward()  # pyright: ignore[reportArgumentType]
    grad = latents.grad
    assert grad is not None
    learned, masked = grad[..., :half].abs().sum().item(), grad[..., half:].abs().max().item()
    assert learned > 0 and masked == 0, (
        f"{model}: gradient on the learned half {learned}, masked half {masked}"
    )


def _masked_set(folder, sample_dataset, masks: bool = True):
    """Eight 64 px images: a sample image's left half beside a flat green background; the masks keep
    the left half (one at twice the size, one named by metadata.jsonl instead of by its file name)."""
    folder.mkdir()
    rows = []
    for k, src in enumerate(sorted(sample_dataset.glob("*.png"))):
        image = Image.new("RGB", (64, 64), (40, 200, 60))
        image.paste(Image.open(src).convert("RGB").resize((64, 64)).crop((0, 0, 32, 64)), (0, 0))
        image.save(folder / f"img_{k}.png")
        (folder / f"img_{k}.txt").write_text((sample_dataset / f"{src.stem}.txt").read_text())
        if masks:
            size = 128 if k == 1 else 64
            mask = Image.new("L", (size, size), 0)
            mask.paste(255, (0, 0, size // 2, size))
            name = f"keep_{k}.png" if k == 2 else f"img_{k}_mask.png"
            mask.save(folder / name)
            if k == 2:
                rows.append({"file_name": f"img_{k}.png", "mask_file_name": name})
    if rows:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_masked_set_packs_stages_and_trains(tiny_weights, sample_dataset, tmp_path):
    from client.pack import pack_dataset

    data = _masked_set(tmp_path / "data", sample_dataset)
    packed = pack_dataset(data, tmp_path / "set.zip", model="flux-dev")
    assert (packed.images, packed.masks, packed.skipped) == (8, 8, []), packed.summary()
    assert "loss masks: 8" in packed.summary()
    with zipfile.ZipFile(packed.archive) as zf:
        assert {"img_0_mask.png", "keep_2.png", "metadata.jsonl"} <= set(zf.namelist())

    spec = quick_spec(tiny_weights, steps=6, learning_rate=1e-2)
    masked, _ = train_quietly(spec, packed.archive, tmp_path / "masked")
    report = json.loads((tmp_path / "masked" / "dataset_report.json").read_text())
    assert report["images_used"] == 8 and not report["skipped"], report
    masks = {e["name"]: e.get("mask") for e in report["images"]}
    assert masks["img_2.png"] == "keep_2.png" and masks["img_1.png"] == "img_1_mask.png"

    plain, _ = train_quietly(
        spec, _masked_set(tmp_path / "plain-data", sample_dataset, masks=False), tmp_path / "plain"
    )
    a, b = load_file(str(masked.lora_file)), load_file(str(plain.lora_file))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) > 1e-4, (
        "the masks changed nothing"
    )


def test_masks_the_trainer_cannot_use_are_named(tmp_path, sample_dataset):
    from client.pack import pack_dataset
    from train.data import stage_dataset

    data = _masked_set(tmp_path / "data", sample_dataset)
    Image.new("L", (64, 32), 255).save(data / "img_3_mask.png")  # another shape than its image
    Image.new("L", (64, 64), 0).save(data / "img_4_mask.png")  # black everywhere
    (data / "img_5_mask.txt").write_text("a caption for a mask")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(data / "gas_mask.png")  # no gas.png: an ordinary image
    (data / "gas_mask.txt").write_text("a gas mask")

    staged = stage_dataset(data, tmp_path / "job")
    skipped = dict(staged.skipped)
    assert "img_3_mask.png is 64x32 and the image 64x64" in skipped["img_3.png"]
    assert "black everywhere" in skipped["img_4.png"]
    assert "caption of a loss mask" in skipped["img_5_mask.txt"]
    used = {r.name: r.mask for r in staged.images}
    assert "gas_mask.png" in used and used["gas_mask.png"] is None and used["img_0.png"] is not None

    packed = pack_dataset(data, tmp_path / "set.zip", model="flux-dev")
    left_out = dict(packed.skipped)
    assert "a mask must have the image's shape" in left_out["img_3.png"]
    assert "img_3_mask.png" in left_out and "img_3.png" not in {c.path for c in packed.changed}
