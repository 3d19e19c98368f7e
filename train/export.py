"""Export: the output folder that becomes the output archive (the table in README.md).

pytorch_lora_weights.safetensors   LoRA, diffusers/peft format: pipe.load_lora_weights(folder)
lora_kohya.safetensors             the same LoRA in kohya / ComfyUI naming
config.json                        resolved spec, library versions, dataset hash, timings, device
dataset_report.json                images used, skipped files with reasons, buckets
samples/step-NNNNNN-K.png          validation images
loss.png                           the loss curve
steps/step-N/                      the LoRA of every validation step (the top-level files: the chosen one's)
scores.json, scores.png            each validation step's scores, the chosen step and why
contact_sheet.png                  prompts x steps, the chosen step marked, scores under each column
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
from diffusers.training_utils import _collate_lora_metadata
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from . import lycoris
from .families import model_info
from .models.base import Family
from .selection import LABELS, METRICS, Choice, StepScores
from .spec import TrainingSpec
from .trained import LOW_NOISE_FILE

CONTACT_SHEET = "contact_sheet.png"
SCORE_PLOT = "scores.png"
CHOSEN_COLOR = (230, 40, 40)  # the chosen step's frame on the contact sheet
SHEET_CELL, SHEET_PAD, SHEET_LABEL_W, SHEET_HEAD_H = 192, 4, 180, 24  # its layout, in pixels
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


EXPORT_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_lora(
    family: Family,
    state_dict: dict[str, torch.Tensor],
    lora_config: dict[str, Any],
    out_dir: Path,
    alpha: float,
    rank: int,
    kohya: bool = True,
) -> dict[str, Path]:
    """The LoRA files in ``spec.export.dtype``: the diffusers file, and (``kohya``, where the family
    has the convention) the kohya/ComfyUI one, converted in fp32 and cast last."""
    dtype = EXPORT_TORCH_DTYPES[family.spec.export.dtype]
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    kind = family.spec.lora.type
    if kind in lycoris.KINDS:  # LoKr / LoHa: the scale folded in, so every loader applies 1
        sd = lycoris.baked(sd, kind, alpha / rank)
        lora_config = lycoris.export_metadata(lora_config)
    diffusers_file = family.save_lora(out_dir, {k: v.to(dtype) for k, v in sd.items()}, lora_config)
    files = {"diffusers": diffusers_file}
    files.update({f"diffusers:{p.name}": p for p in family.companion_files(out_dir)})
    info = model_info(family.spec.model)
    if kind in lycoris.KINDS:
        kohya_sd = lycoris.comfy_state_dict(sd, kind) if kohya and info.lycoris_naming else None
    else:
        kohya_sd = family.kohya_state_dict(sd, alpha) if kohya else None
    if kohya_sd is None:  # not asked, or the family has no kohya / ComfyUI convention (docs/families.md)
        return files
    metadata = {
        "ss_network_module": info.kohya_network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "modelspec.architecture": info.kohya_architecture,
        "modelspec.sai_model_spec": "1.0.0",
        "trained_with": "advanced-trainer",
    }
    companions = family.kohya_companions(sd, alpha)
    if kind in lycoris.KINDS:  # what LyCORIS's own kohya network writes; the scale is in the tensors
        args = {"algo": kind, **({"factor": str(family.spec.lora.factor)} if kind == "lokr" else {})}
        metadata.update(
            ss_network_module="lycoris.kohya", ss_network_args=json.dumps(args), ss_network_alpha=str(rank)
        )
        companions = {}
    save_file({k: v.to(dtype).contiguous() for k, v in kohya_sd.items()}, str(out_dir / KOHYA_FILE), metadata)
    files["kohya"] = out_dir / KOHYA_FILE
    for name, extra in companions.items():
        save_file({k: v.to(dtype).contiguous() for k, v in extra.items()}, str(out_dir / name), metadata)
        files[f"kohya:{name}"] = out_dir / name
    return files


def trainable_state(spec: TrainingSpec, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train: the LoRA (peft naming), or the whole denoiser of a full fine-tune."""
    return get_peft_model_state_dict(model) if spec.mode == "lora" else model.state_dict()


def export_weights(spec: TrainingSpec, family: Family, model: torch.nn.Module, out_dir: Path) -> list[Path]:
    """The trained weights into ``out_dir``: the LoRA files (diffusers, then kohya where the family has
    that convention), or a full fine-tune's pipeline folder ``model/``."""
    if spec.mode == "full":
        return [export_full_model(family, model, out_dir / "model")]
    meta = _collate_lora_metadata({family.denoiser_name: model})[
        f"{family.denoiser_name}_lora_adapter_metadata"
    ]
    alpha = spec.lora.alpha
    assert alpha is not None, "the spec resolves lora.alpha's default"
    out_dir.mkdir(parents=True, exist_ok=True)
    kohya = spec.export.writes_kohya(spec.model)
    files = export_lora(family, trainable_state(spec, model), meta, out_dir, alpha, spec.lora.rank, kohya)
    # [the diffusers file, its companions (Wan 2.2 A14B's low-noise expert), then the kohya files]
    return [files["diffusers"], *(p for k, p in files.items() if k.startswith("diffusers:"))] + [
        p for k, p in files.items() if k == "kohya" or k.startswith("kohya:")
    ]


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


def write_score_plot(records: list[StepScores], chosen: int, path: Path) -> None:
    """One panel per score that was measured, by step; the chosen step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(r.mean(m) is not None for r in records)]
    fig, axes = plt.subplots(max(1, len(metrics)), 1, figsize=(7, 2.4 * max(1, len(metrics))), dpi=100)
    axes = list(axes) if len(metrics) > 1 else [axes]
    for ax, m in zip(axes, metrics or [None], strict=True):
        ax.axvline(chosen, color="tab:red", ls="--", lw=1.2, label=f"chosen: step {chosen}")
        if m is not None:
            pts = [(r.step, v) for r in records if (v := r.mean(m)) is not None]
            ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", lw=1.4)
            ax.set_ylabel(LABELS[m] + (" (lower is better)" if METRICS[m] < 0 else ""))
        else:
            ax.set_ylabel("nothing scored")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_contact_sheet(
    records: list[StepScores], prompts: list[str], chosen: int, out_dir: Path, path: Path
) -> None:
    """Prompts (rows) x validation steps (columns), the chosen column framed, scores under each."""
    from PIL import Image, ImageDraw

    cell, pad, label_w, head_h = SHEET_CELL, SHEET_PAD, SHEET_LABEL_W, SHEET_HEAD_H
    foot_h = 14 * (1 + len(METRICS))
    cols = [r for r in records if r.renders]
    rows = max(len(r.renders) for r in cols)
    sheet = Image.new(
        "RGB", (label_w + len(cols) * (cell + pad), head_h + rows * (cell + pad) + foot_h), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for k in range(rows):
        text = prompts[k] if k < len(prompts) else f"prompt {k}"
        draw.text((4, head_h + k * (cell + pad) + 4), _wrap(text, 28), fill="black")
    for c, rec in enumerate(cols):
        x = label_w + c * (cell + pad)
        mark = rec.step == chosen
        draw.text(
            (x + 2, 6),
            f"step {rec.step}" + ("  (chosen)" if mark else ""),
            fill=CHOSEN_COLOR if mark else "black",
        )
        for k, rel in enumerate(rec.renders):
            with Image.open(out_dir / rel) as img:
                sheet.paste(img.convert("RGB").resize((cell, cell)), (x, head_h + k * (cell + pad)))
        lines = [f"{LABELS[m]}: {v:.4f}" for m in METRICS if (v := rec.mean(m)) is not None] or ["not scored"]
        draw.text((x + 2, head_h + rows * (cell + pad) + 2), "\n".join(lines), fill="black")
        if mark:
            bottom = head_h + rows * (cell + pad) - pad
            draw.rectangle((x - 2, head_h - 2, x + cell + 1, bottom + 1), outline=CHOSEN_COLOR, width=3)
    sheet.save(path)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line][:8])


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
    path: Path,
    spec: TrainingSpec,
    samples: list[tuple[str, str]],
    final_loss: float | None,
    n_images: int,
    choice: Choice | None = None,
) -> None:
    """A Hugging Face style model card (YAML front matter + usage); ``samples`` are (prompt, file)."""
    lines = [
        *_card_front_matter(spec, samples),
        *_card_summary(spec, final_loss, n_images),
        *_card_choice(choice),
        *_card_usage(spec, samples),
        *_card_files(spec, samples),
    ]
    path.write_text("\n".join(lines))


def _card_choice(choice: Choice | None) -> list[str]:
    if choice is None:
        return []
    return [
        "",
        "## Which step",
        "",
        f"These weights are step {choice.step} (selection rule `{choice.rule}`): {choice.reason}.",
        f"Every validation step's LoRA is kept under `steps/step-N/`; `{CONTACT_SHEET}` shows the "
        f"renders of each, and `scores.json` / `{SCORE_PLOT}` their scores.",
    ]


def _pipeline_name(spec: TrainingSpec) -> str:
    return model_info(spec.model).pipeline


def _base_weights(spec: TrainingSpec) -> str:
    assert spec.base_weights is not None, "the spec resolves base_weights' default"
    return spec.base_weights


def _task(spec: TrainingSpec) -> str:
    """The Hub's task tag: text-to-image, or a video model's text- / image-to-video."""
    info = model_info(spec.model)
    return "image-to-video" if info.image_to_video else "text-to-video" if info.video else "text-to-image"


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
        f"- {_task(spec)}",
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
        f"Trained with advanced-trainer: {spec.steps} steps on {n_images} "
        f"{'clips and images' if model_info(spec.model).video else 'images'} at "
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
    if pipeline.endswith("ModularPipeline"):
        return _modular_usage(spec, example_prompt)
    if spec.mode == "full":
        load = [
            f'pipe = {pipeline}.from_pretrained("path/to/this/folder/model", torch_dtype=torch.bfloat16)'
            '.to("cuda")'
        ]
    else:
        load = [
            f'pipe = {pipeline}.from_pretrained("{_base_weights(spec)}", torch_dtype=torch.bfloat16)'
            '.to("cuda")',
            _card_load_adapter(spec),
        ]
    lines = [
        "",
        "## Use with diffusers",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        *_video_usage(spec, load, example_prompt),
        "```",
        "",
    ]
    info = model_info(spec.model)
    if spec.mode != "full" and spec.lora.type in lycoris.KINDS:
        lines += [
            f"A LyCORIS {LYCORIS_NAMES[spec.lora.type]}: ComfyUI and Forge "
            "load `pytorch_lora_weights.safetensors` as it is"
            + (
                f", and `{KOHYA_FILE}` holds it in LyCORIS's own naming."
                if spec.export.writes_kohya(spec.model) and info.lycoris_naming
                else "."
            ),
            "",
        ]
    elif spec.mode != "full" and info.comfy_naming:
        lines += [
            f"`{KOHYA_FILE}` holds the same LoRA in kohya naming for ComfyUI, Forge and sd-scripts.",
            "",
        ]
    return lines


LYCORIS_NAMES = {"lokr": "LoKr", "loha": "LoHa"}  # as their authors write them


def _modular_usage(spec: TrainingSpec, prompt: str) -> list[str]:
    """A modular pipeline's snippet (FLUX.3): its blocks from the folder, the prompt upsampler taken
    out (the LoRA learnt the captions as written), the components loaded, the images as output."""
    folder = "path/to/this/folder/model" if spec.mode == "full" else _base_weights(spec)
    adapter = [] if spec.mode == "full" else [_card_load_adapter(spec)]
    return [
        "",
        "## Use with diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import ModularPipeline",
        "",
        f'blocks = ModularPipeline.from_pretrained("{folder}").blocks',
        'blocks.sub_blocks.pop("prompt_upsampler")  # encode the prompt as written, as it was trained',
        f'pipe = blocks.init_pipeline("{folder}")',
        "pipe.load_components(dtype=torch.bfloat16)",
        'pipe.to("cuda")',
        *adapter,
        f'image = pipe(prompt={json.dumps(prompt)}, output="images")[0]',
        "```",
        "",
        *(
            [f"`{KOHYA_FILE}` holds the same LoRA in the original checkpoint's names for ComfyUI.", ""]
            if spec.mode != "full" and spec.export.writes_kohya(spec.model)
            else []
        ),
    ]


def _card_load_adapter(spec: TrainingSpec) -> str:
    """The diffusers line that loads the adapter: a pipeline's ``load_lora_weights`` reads LoRA; a
    LoKr loads through the denoiser's own ``load_lora_adapter``; diffusers has no LoHa reader."""
    denoiser = model_info(spec.model).denoiser
    if spec.lora.type == "lokr":
        return (
            f'pipe.{denoiser}.load_lora_adapter("path/to/this/folder", '
            f'weight_name="pytorch_lora_weights.safetensors", prefix="{denoiser}")  # a LoKr'
        )
    if spec.lora.type == "loha":
        return (
            "# a LoHa: diffusers has no LoHa reader; load it with ComfyUI, Forge or this project's run entry"
        )
    return 'pipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors'


def _video_usage(spec: TrainingSpec, load: list[str], prompt: str) -> list[str]:
    """The usage snippet after the pipeline's import: load it (and the LoRA), render, save."""
    info = model_info(spec.model)
    if not info.video:
        return ["", *load, f"image = pipe({json.dumps(prompt)}).images[0]"]
    if info.experts > 1 and spec.mode != "full" and spec.video.expert == "both":
        load = [
            *load,
            f'pipe.load_lora_weights("path/to/this/folder", weight_name="{LOW_NOISE_FILE}", '
            "load_into_transformer_2=True)",
        ]
    frames = f"num_frames={info.max_frames}"
    if info.image_to_video:
        imports, call = (
            "export_to_video, load_image",
            f'image=load_image("first_frame.png"), prompt={json.dumps(prompt)}',
        )
    else:
        imports, call = "export_to_video", json.dumps(prompt)
    return [
        f"from diffusers.utils import {imports}",
        "",
        *load,
        f"video = pipe({call}, {frames}).frames[0]",
        f'export_to_video(video, "out.mp4", fps={info.fps:g})',
    ]


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
        f"- `samples/`: validation {'videos (`.mp4`, and a strip of their frames)' if model_info(spec.model).video else 'images'}; "
        "`loss.png`: the loss curve",
        "- `steps/step-N/`: the LoRA of each validation step; `scores.json`, `scores.png`, "
        f"`{CONTACT_SHEET}`: how each step scored",
        "",
    ]
    if samples:
        lines += ["## Samples", ""] + [f"![{p}]({f})" for p, f in samples[:8]] + [""]
    return lines
