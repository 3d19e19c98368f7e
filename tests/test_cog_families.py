"""The run entry renders a LoRA of every model family through the real Cog server exactly as the
model's stock diffusers pipeline does, on the GPU's dtype path: trained in bf16, rendered in bf16
(every model's run entry in fp32, with and without its LoRA, is the family contract's,
tests/test_family_contract.py, in-process).

One run-mode server serves every family, in the dtype it uses on a GPU (``ADVANCED_TRAINER_RUN_DTYPE
=bf16`` forces it on a CPU): ``lora_weights`` = a LoRA trained here in bf16 on the family's tiny
pipeline, uploaded to the file store as an output archive; the server loads the base that LoRA was
trained on. Edit models train on before/after pairs and edit an ``input_image`` (sent as a data URI,
as a client would).
"""

from __future__ import annotations

import base64
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    RENDER_INPUT,
    SLOW_IN_BF16_ON_A_CPU,
    cog_server_fixture,
    quick_spec,
    stock_render,
    train_quietly,
)
from train.families import MODEL_IDS, model_info
from train.sample_data import draw_pair

PROMPT = "sks, a red circle"
LEARNING_RATE = {"flux2-klein-4b": 5e-2}  # its tiny LoRA needs a harder push to show in 6 steps
TOLERANCE = 2  # 8-bit levels: our renderer and the stock pipeline run the same bf16 ops (tests/test_cog.py)


def _image(value: str) -> np.ndarray:
    data = base64.b64decode(value.split(",", 1)[1]) if value.startswith("data:") else Path(value).read_bytes()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


# the held-out image an edit model edits (never trained on)
CONTROL = draw_pair(99)[0]


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _stock(model: str, base: Path, lora_dir: Path | None = None, dtype=torch.bfloat16) -> np.ndarray:
    """What a user gets from the model's stock diffusers pipeline (and ``load_lora_weights``)."""
    control = CONTROL if model_info(model).controls_required else None
    return stock_render(model, base, lora_dir, None, dtype, control, PROMPT)


def _render(server, **inputs) -> np.ndarray:
    body = {**RENDER_INPUT, "prompt": PROMPT, **inputs}
    r = server.post("/predictions", {"input": body})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "succeeded", out.get("error") or out.get("logs", "")[-2000:]
    return _image(out["output"][0])


# one model per family (the maths are the family's; its models differ in sizes and defaults); video
# models render through Cog in their own contract (tests/test_family_video.py)
FIRST_OF_EACH_FAMILY = list(
    {model_info(m).family: m for m in reversed(MODEL_IDS) if not model_info(m).video}.values()
)[::-1]


@pytest.fixture(scope="module")
def bf16_server(tmp_path_factory, cog_weights, jobs_dir):
    """The trainer's own version, rendering in bf16 as it does on a GPU."""
    yield from cog_server_fixture(
        "run",
        tmp_path_factory,
        cog_weights,
        jobs_dir,
        ADVANCED_TRAINER_RUN_DTYPE="bf16",
        ADVANCED_TRAINER_LORA_CACHE=str(tmp_path_factory.mktemp("lora-cache-bf16")),
    )


@pytest.mark.parametrize("model", FIRST_OF_EACH_FAMILY)
def test_the_run_entry_renders_each_family_s_lora_through_cog(
    model, tmp_path, cog_weights, bf16_server, run_servers, sample_dataset, pair_dataset, upload_sink
):
    """The trainer's own version (one run-mode server for every family: it switches to the base a
    LoRA was trained on) renders ``lora_weights`` = a LoRA trained here on the model's tiny
    pipeline, uploaded as an output archive, as the stock pipeline renders with that LoRA."""
    info = model_info(model)
    base = cog_weights / info.tiny_name
    spec = quick_spec(
        cog_weights,
        model,
        steps=6,
        learning_rate=LEARNING_RATE.get(model, 1e-2),
        trigger_word="sks",
        # the GPU's path: frozen weights in bf16, the LoRA in fp32 under autocast (fp32 where a CPU
        # takes minutes over it: SLOW_IN_BF16_ON_A_CPU)
        precision="fp32" if model in SLOW_IN_BF16_ON_A_CPU else "bf16",
    )
    edit = {"input_image": _data_uri(CONTROL)} if info.controls_required else {}
    result, _ = train_quietly(spec, pair_dataset if edit else sample_dataset, tmp_path / "out")
    assert result is not None
    archive = shutil.make_archive(str(tmp_path / "weights"), "zip", tmp_path / "out")
    url = upload_sink.put(f"weights-{model}.zip", Path(archive).read_bytes(), "application/zip")
    lora_dir = tmp_path / "lora"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(lora_dir)

    bf16 = model not in SLOW_IN_BF16_ON_A_CPU
    server = bf16_server if bf16 else run_servers.get(None)
    with_lora = _render(server, lora_weights=url, **edit)
    loaded = [ln for ln in server.log_path.read_text().splitlines() if f"render: loaded {model} from" in ln]
    assert loaded and f"on cpu in {'bfloat16' if bf16 else 'float32'}" in loaded[-1], loaded
    dtype = torch.bfloat16 if bf16 else torch.float32
    stock_plain, stock_lora = _stock(model, base, dtype=dtype), _stock(model, base, lora_dir, dtype=dtype)
    assert np.abs(with_lora - stock_lora).max() <= TOLERANCE, (
        "the LoRA render differs from the stock pipeline's"
    )
    assert np.abs(stock_lora - stock_plain).max() > 2, "the trained LoRA does not change the image"
