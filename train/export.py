"""Export: the output folder that becomes the output archive (the table in README.md).

pytorch_lora_weights.safetensors   LoRA, diffusers/peft format: pipe.load_lora_weights(folder)
lora_kohya.safetensors             the same LoRA in kohya / ComfyUI naming
config.json                        resolved spec, library versions, dataset hash, timings, device
dataset_report.json                images used, skipped files with reasons, buckets
samples/step-NNNNNN-K.png          validation images
loss.png                           the loss curve
README.md                          model card
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import save_file

from .families import model_info
from .models.base import Family
from .spec import TrainingSpec

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
_LIBRARIES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "pillow",
    "bitsandbytes",
    "prodigyopt",
)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_info() -> dict[str, Any]:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "type": "cuda",
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": 1}


def export_lora(
    family: Family,
    state_dict: dict[str, torch.Tensor],
    lora_config: dict[str, Any],
    out_dir: Path,
    alpha: float,
    rank: int,
) -> dict[str, Path]:
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    diffusers_file = family.save_lora(out_dir, sd, lora_config)
    files = {"diffusers": diffusers_file}
    info = model_info(family.spec.model)
    kohya = family.kohya_state_dict(sd, alpha)
    if kohya is None:  # the family has no kohya / ComfyUI convention (docs/families.md)
        return files
    save_file(
        kohya,
        str(out_dir / KOHYA_FILE),
        metadata={
            "ss_network_module": info.kohya_network_module,
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "modelspec.architecture": info.kohya_architecture,
            "modelspec.sai_model_spec": "1.0.0",
            "trained_with": "advanced-trainer",
        },
    )
    return {**files, "kohya": out_dir / KOHYA_FILE}


def export_full_model(family: Family, model: torch.nn.Module, folder: Path) -> Path:
    """A full fine-tune as a complete diffusers pipeline folder: the trained denoiser, and the base
    model's other components linked (or copied) unchanged, so ``Pipeline.from_pretrained(folder)`` works."""
    assert isinstance(model, ModelMixin), (
        f"a full fine-tune saves a diffusers model, not {type(model).__name__}"
    )
    base = family.base_dir
    if folder.exists():
        shutil.rmtree(folder)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)  # same filesystem: no second copy of multi-GB text encoders
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(
        base, folder, copy_function=link_or_copy, ignore=shutil.ignore_patterns(family.denoiser_name)
    )
    model.save_pretrained(folder / family.denoiser_name, safe_serialization=True)
    return folder


def write_loss_plot(history: list[tuple[int, float]], path: Path) -> None:
    # matplotlib loads here, once per run at export: importing it costs about a second
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in history]
    losses = [v for _, v in history]
    smooth: list[float] = []
    ema: float | None = None
    for v in losses:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        smooth.append(ema)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    ax.plot(steps, smooth, lw=1.6, label="EMA 0.9")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_config(
    path: Path, spec: TrainingSpec, dataset_hash: str, timings: dict[str, float], extra: dict[str, Any]
) -> None:
    doc = {
        "trainer": "advanced-trainer",
        "spec": json.loads(spec.to_json()),
        "libraries": library_versions(),
        "dataset_hash": dataset_hash,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "device": device_info(),
        "argv": sys.argv[:1],
        **extra,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def write_model_card(
    path: Path, spec: TrainingSpec, samples: list[tuple[str, str]], final_loss: float | None, n_images: int
) -> None:
    """A Hugging Face style model card (YAML front matter + usage); ``samples`` are (prompt, file)."""
    lines = [
        *_card_front_matter(spec, samples),
        *_card_summary(spec, final_loss, n_images),
        *_card_usage(spec, samples),
        *_card_files(spec, samples),
    ]
    path.write_text("\n".join(lines))


def _pipeline_name(spec: TrainingSpec) -> str:
    return model_info(spec.model).pipeline


def _base_weights(spec: TrainingSpec) -> str:
    assert spec.base_weights is not None, "the spec resolves base_weights' default"
    return spec.base_weights


def _card_front_matter(spec: TrainingSpec, samples: list[tuple[str, str]]) -> list[str]:
    base = _base_weights(spec)
    # The Hub checks base_model against its repos: only a Hub id goes there, never a local folder.
    hub_id = re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", base) and not Path(base).exists()
    lines = [
        "---",
        *([f"base_model: {base}"] if hub_id else []),
        "library_name: diffusers",
        "license: other",
        "tags:",
        "- text-to-image",
        "- lora",
        "- diffusers",
        f"- {model_info(spec.model).hub_tag}",
        "- advanced-trainer",
    ]
    if spec.trigger_word:
        lines.append(f"instance_prompt: {json.dumps(spec.trigger_word)}")
    widget = "\n".join(f"- text: {json.dumps(p)}\n  output:\n    url: {f}" for p, f in samples[:4])
    if widget:
        lines += ["widget:", widget]
    return [*lines, "---"]


def _card_summary(spec: TrainingSpec, final_loss: float | None, n_images: int) -> list[str]:
    full = spec.mode == "full"
    assert spec.learning_rate is not None, "the spec resolves learning_rate's default"
    if full:
        shape = "full fine-tune, "
    else:
        assert spec.lora.alpha is not None, "the spec resolves lora.alpha's default"
        shape = f"rank {spec.lora.rank}, alpha {spec.lora.alpha:g}, "
    lines = [
        "",
        f"# {'Fine-tune' if full else 'LoRA'} of {_base_weights(spec)}",
        "",
        f"Trained with advanced-trainer: {spec.steps} steps on {n_images} images at "
        f"{', '.join(str(r) for r in spec.resolutions)} px, {shape}"
        f"learning rate {spec.learning_rate:g} ({spec.optimizer}, {spec.lr_scheduler}).",
    ]
    if final_loss is not None:
        lines.append(f"Final training loss (EMA): {final_loss:.4f}.")
    if spec.trigger_word:
        lines += ["", f"Trigger word: `{spec.trigger_word}` — put it in your prompt."]
    return lines


def _card_usage(spec: TrainingSpec, samples: list[tuple[str, str]]) -> list[str]:
    pipeline = _pipeline_name(spec)
    example_prompt = samples[0][0] if samples else (spec.trigger_word or "a photo")
    if spec.mode == "full":
        load = [
            f'pipe = {pipeline}.from_pretrained("path/to/this/folder/model", torch_dtype=torch.bfloat16)'
            '.to("cuda")'
        ]
    else:
        load = [
            f'pipe = {pipeline}.from_pretrained("{_base_weights(spec)}", torch_dtype=torch.bfloat16)'
            '.to("cuda")',
            'pipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors',
        ]
    lines = [
        "",
        "## Use with diffusers",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        "",
        *load,
        f"image = pipe({json.dumps(example_prompt)}).images[0]",
        "```",
        "",
    ]
    if spec.mode != "full" and model_info(spec.model).comfy_naming:
        lines += [
            f"`{KOHYA_FILE}` holds the same LoRA in kohya naming for ComfyUI, Forge and sd-scripts.",
            "",
        ]
    return lines


def _card_files(spec: TrainingSpec, samples: list[tuple[str, str]]) -> list[str]:
    if spec.mode == "full":
        files = [
            "- `model/`: the whole pipeline in diffusers layout, with the fine-tuned "
            f"{'UNet' if model_info(spec.model).denoiser == 'unet' else 'transformer'}"
        ]
    else:
        files = [f"- `{LORA_FILE}`: diffusers / peft format"]
        if model_info(spec.model).comfy_naming:
            files.append(f"- `{KOHYA_FILE}`: kohya / ComfyUI format")
    lines = [
        "## Files",
        "",
        *files,
        "- `config.json`: the resolved training spec, library versions, dataset hash, timings and device",
        "- `samples/`: validation images; `loss.png`: the loss curve",
        "",
    ]
    if samples:
        lines += ["## Samples", ""] + [f"![{p}]({f})" for p, f in samples[:8]] + [""]
    return lines
