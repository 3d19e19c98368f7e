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
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .spec import TrainingSpec

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "pillow", "bitsandbytes",
              "prodigyopt")


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
        return {"type": "cuda", "name": props.name, "count": torch.cuda.device_count(),
                "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": 1}


def export_lora(family, state_dict: dict[str, torch.Tensor], lora_config: dict[str, Any], out_dir: Path,
                alpha: float, rank: int) -> dict[str, Path]:
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    diffusers_file = family.save_lora(out_dir, sd, lora_config)
    kohya = family.kohya_state_dict(sd, alpha)
    arch = "flux-1-dev/lora" if family.spec.model == "flux-dev" else (
        "flux-1-schnell/lora" if family.spec.model == "flux-schnell" else "stable-diffusion-xl-v1-base/lora")
    save_file(kohya, str(out_dir / KOHYA_FILE), metadata={
        "ss_network_module": "networks.lora_flux" if family.spec.family == "flux" else "networks.lora",
        "ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "modelspec.architecture": arch,
        "modelspec.sai_model_spec": "1.0.0", "trained_with": "advanced-trainer",
    })
    return {"diffusers": diffusers_file, "kohya": out_dir / KOHYA_FILE}


def export_full_model(family, model: torch.nn.Module, folder: Path) -> Path:
    """A full fine-tune as a complete diffusers pipeline folder: the trained denoiser, and the base
    model's other components linked (or copied) unchanged, so ``Pipeline.from_pretrained(folder)`` works."""
    import os
    import shutil

    base = family.base_dir
    if folder.exists():
        shutil.rmtree(folder)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)  # same filesystem: no second copy of multi-GB text encoders
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(base, folder, copy_function=link_or_copy, ignore=shutil.ignore_patterns(family.denoiser_name))
    model.save_pretrained(folder / family.denoiser_name, safe_serialization=True)
    return folder


def write_loss_plot(history: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in history]
    losses = [v for _, v in history]
    smooth, ema = [], None
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


def write_config(path: Path, spec: TrainingSpec, dataset_hash: str, timings: dict[str, float],
                 extra: dict[str, Any]) -> None:
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


def write_model_card(path: Path, spec: TrainingSpec, samples: list[tuple[str, str]], final_loss: float | None,
                     n_images: int) -> None:
    """A Hugging Face style model card (YAML front matter + usage)."""
    pipeline = "FluxPipeline" if spec.family == "flux" else "StableDiffusionXLPipeline"
    full = spec.mode == "full"
    trigger = spec.trigger_word
    widget = "\n".join(f"- text: {json.dumps(p)}\n  output:\n    url: {f}" for p, f in samples[:4])
    # The Hub checks base_model against its repos: only a Hub id goes there, never a local folder.
    hub_id = re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", spec.base_weights) and not Path(spec.base_weights).exists()
    lines = [
        "---",
        *([f"base_model: {spec.base_weights}"] if hub_id else []),
        "library_name: diffusers",
        "license: other",
        "tags:",
        "- text-to-image",
        "- lora",
        "- diffusers",
        f"- {'flux' if spec.family == 'flux' else 'stable-diffusion-xl'}",
        "- advanced-trainer",
    ]
    if trigger:
        lines.append(f"instance_prompt: {json.dumps(trigger)}")
    if widget:
        lines += ["widget:", widget]
    lines += [
        "---",
        "",
        f"# {'Fine-tune' if full else 'LoRA'} of {spec.base_weights}",
        "",
        f"Trained with advanced-trainer: {spec.steps} steps on {n_images} images at "
        f"{', '.join(str(r) for r in spec.resolutions)} px, "
        + ("full fine-tune, " if full else f"rank {spec.lora.rank}, alpha {spec.lora.alpha:g}, ")
        + f"learning rate {spec.learning_rate:g} ({spec.optimizer}, {spec.lr_scheduler}).",
    ]
    if final_loss is not None:
        lines.append(f"Final training loss (EMA): {final_loss:.4f}.")
    if trigger:
        lines += ["", f"Trigger word: `{trigger}` — put it in your prompt."]
    example_prompt = samples[0][0] if samples else (trigger or "a photo")
    if full:
        load = [f'pipe = {pipeline}.from_pretrained("path/to/this/folder/model", torch_dtype=torch.bfloat16).to("cuda")']
        files = ["- `model/`: the whole pipeline in diffusers layout, with the fine-tuned "
                 f"{'transformer' if spec.family == 'flux' else 'UNet'}"]
    else:
        load = [f'pipe = {pipeline}.from_pretrained("{spec.base_weights}", torch_dtype=torch.bfloat16).to("cuda")',
                'pipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors']
        files = [f"- `{LORA_FILE}`: diffusers / peft format", f"- `{KOHYA_FILE}`: kohya / ComfyUI format"]
    lines += [
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
    if not full:
        lines += [f"`{KOHYA_FILE}` holds the same LoRA in kohya naming for ComfyUI, Forge and sd-scripts.", ""]
    lines += [
        "## Files",
        "",
        *files,
        "- `config.json`: the resolved training spec, library versions, dataset hash, timings and device",
        "- `samples/`: validation images; `loss.png`: the loss curve",
        "",
    ]
    if samples:
        lines += ["## Samples", ""] + [f"![{p}]({f})" for p, f in samples[:8]] + [""]
    path.write_text("\n".join(lines))
