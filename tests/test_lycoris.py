"""LoKr and LoHa (``lora.type``): they train on a Flux and an SDXL model and change the image, the
LyCORIS package's own reader renders our exported file as our run entry does, the run entry reads
LyCORIS files other trainers write, and the factored forward computes what peft's layers do."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT, quick_spec, run_entry_render, train_quietly
from train import lycoris as ly
from train.families import model_info
from train.spec import SpecError, parse_spec

PROMPT = "sks, a red circle"
TOLERANCE = 2  # of 255


def _train(model: str, kind: str, tiny_weights: Path, data: Path, out: Path, cli: bool) -> str:
    fields = {
        "steps": 8,
        "learning_rate": 2e-2,
        "lora.type": kind,
        "lora.rank": 4,
        "lora.alpha": 8,  # scale 2: folded into the files' first factor
        "lora.factor": 4,  # the tiny models' 32-wide layers: a factor at most their square root
        "export.kohya": "on",
    }
    if not cli:
        return train_quietly(quick_spec(tiny_weights, model, **fields), data, out)[1]
    spec = quick_spec(tiny_weights, model)  # the registry's tiny base, then the fields by --set
    sets = [a for k, v in fields.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "ADVANCED_TRAINER_WEIGHTS": str(tiny_weights), "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_CURRENT_TEST", None)
    spec_file = out.parent / f"{model}-{kind}.json"
    spec_file.write_text(spec.model_dump_json())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--spec",
            str(spec_file),
            "--data",
            str(data),
            "--out",
            str(out),
            *sets,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _lycoris_render(model: str, base: Path, lycoris_file: Path) -> np.ndarray:
    """The stock pipeline with LyCORIS's own reader applying the file to its denoiser."""
    from lycoris import create_lycoris_from_weights

    from train.models import family_class

    info = model_info(model)
    pipe = family_class(model).pipeline_cls.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    network, _ = create_lycoris_from_weights(1.0, str(lycoris_file), getattr(pipe, info.denoiser))
    network.apply_to()
    assert network.loras, "LyCORIS's reader found no module of ours"
    image = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=info.render_guidance,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize(
    "model,kind,cli",
    [
        ("flux-dev", "lokr", True),
        ("flux-dev", "loha", False),
        ("sdxl", "lokr", False),
        ("sdxl", "loha", False),
    ],
)
def test_lokr_and_loha_train_and_lycoris_renders_our_file_as_the_run_entry_does(
    model, kind, cli, tiny_weights, sample_dataset, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    log = _train(model, kind, tiny_weights, sample_dataset, out, cli)
    assert f"{kind}: " in log and "linear layers multiply through the factors" in log

    ours_file, lycoris_file = out / "pytorch_lora_weights.safetensors", out / "lora_kohya.safetensors"
    with safe_open(str(ours_file), framework="pt") as f:
        assert ly.adapter_kind(f.keys()) == kind
    with safe_open(str(lycoris_file), framework="pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("lycoris_") for k in keys) and any(k.endswith(".alpha") for k in keys)
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"

    base = tiny_weights / model_info(model).tiny_name
    ours = run_entry_render(model, base, out, tmp_path / "cache", monkeypatch)
    plain = run_entry_render(model, base, None, tmp_path / "cache", monkeypatch)
    theirs = _lycoris_render(model, base, lycoris_file)
    assert np.abs(ours - theirs).max() <= TOLERANCE, "LyCORIS's reader renders our file differently"
    assert np.abs(ours - plain).max() > 4, f"the {kind} does not change the image"

    card = (out / "README.md").read_text()
    assert ("load_lora_adapter" in card) == (kind == "lokr")
    assert f"A LyCORIS {'LoKr' if kind == 'lokr' else 'LoHa'}:" in card


def _lycoris_network(model: str, tiny_weights: Path, kind: str, **kwargs):
    """A denoiser with a LyCORIS network of another trainer's making (random weights), and the file
    LyCORIS saves for it."""
    from lycoris import LycorisNetwork, create_lycoris

    info = model_info(model)
    denoiser = family_denoiser(model, tiny_weights)
    reference = copy.deepcopy(denoiser)
    targets = (
        ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
        if info.denoiser == "transformer"
        else ["Transformer2DModel", "ResnetBlock2D"]
    )
    LycorisNetwork.apply_preset({"target_module": targets})
    network = create_lycoris(denoiser, 1.0, algo=kind, **kwargs)
    network.apply_to()
    assert len(network.loras) >= 8, f"LyCORIS found {len(network.loras)} modules to adapt"
    torch.manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.2)
    return denoiser, reference, network


def family_denoiser(model: str, tiny_weights: Path) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    info = model_info(model)
    cls = FluxTransformer2DModel if model == "flux-dev" else UNet2DConditionModel
    return cls.from_pretrained(tiny_weights / info.tiny_name / info.denoiser)


def _denoise(model: str, denoiser: torch.nn.Module) -> torch.Tensor:
    c, g = denoiser.config, torch.Generator().manual_seed(0)
    if model == "flux-dev":
        kw = {
            "hidden_states": torch.randn(1, 16, c.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(1, 8, c.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(16, 3),
            "txt_ids": torch.zeros(8, 3),
            "guidance": torch.tensor([3.5]),
        }
    else:
        text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw = {
            "sample": torch.randn(1, c.in_channels, 8, 8, generator=g),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 8, c.cross_attention_dim, generator=g),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(1, text, generator=g),
                "time_ids": torch.randn(1, 6, generator=g),
            },
        }
    with torch.no_grad():
        return denoiser(**kw).sample


FOREIGN = [
    ("flux-dev", "lokr", {"linear_dim": 10000, "linear_alpha": 1, "factor": 4}),  # whole factors, scale 1
    ("flux-dev", "lokr", {"linear_dim": 4, "linear_alpha": 2, "factor": -1}),  # split second factor
    ("flux-dev", "loha", {"linear_dim": 4, "linear_alpha": 2}),
    (
        "sdxl",
        "lokr",
        {"linear_dim": 2, "linear_alpha": 1, "conv_dim": 2, "conv_alpha": 1, "factor": 4, "use_tucker": True},
    ),
    (
        "sdxl",
        "loha",
        {"linear_dim": 2, "linear_alpha": 1, "conv_dim": 2, "conv_alpha": 1, "use_tucker": True},
    ),
]


@pytest.mark.parametrize("model,kind,kwargs", FOREIGN)
def test_the_run_entry_reads_lycoris_files_other_trainers_write(model, kind, kwargs, tiny_weights, tmp_path):
    denoiser, reference, network = _lycoris_network(model, tiny_weights, kind, **kwargs)
    path = tmp_path / "theirs.safetensors"
    network.save_weights(str(path), torch.float32, None)
    state = load_file(str(path))
    assert any(k.endswith(".alpha") for k in state) and all(k.startswith("lycoris_") for k in state)

    want, before = _denoise(model, denoiser), _denoise(model, reference)
    assert ly.load_adapter(reference, state, "theirs") == kind
    got = _denoise(model, reference)
    assert (want - before).abs().max() > 1e-3, "the foreign network changes nothing: no check"
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_a_lycoris_file_for_another_model_is_refused_naming_the_modules(tiny_weights, tmp_path):
    _, _, network = _lycoris_network("sdxl", tiny_weights, "lokr", linear_dim=2, factor=4)
    flux = family_denoiser("flux-dev", tiny_weights)
    saved = tmp_path / "sdxl.safetensors"
    network.save_weights(str(saved), torch.float32, None)
    with pytest.raises(ly.LycorisError, match="module.*the model does not have.*down_blocks"):
        ly.load_adapter(flux, load_file(str(saved)), "wrong")
    assert not getattr(flux, "peft_config", {}), "a refused file left an adapter behind"


@pytest.mark.parametrize(
    "kind,config",
    [
        ("lokr", {"r": 4, "alpha": 8, "decompose_factor": 8}),  # whole W1, split W2
        ("lokr", {"r": 64, "alpha": 8, "decompose_factor": 8}),  # whole W1 and W2
        ("lokr", {"r": 2, "alpha": 4, "decompose_factor": 8, "decompose_both": True}),  # both split
        ("loha", {"r": 3, "alpha": 6}),
    ],
)
def test_the_factored_forward_computes_what_peft_computes(kind, config, monkeypatch):
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    cls = LoKrConfig if kind == "lokr" else LoHaConfig
    torch.manual_seed(0)
    models = []
    for factored in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 192))
        model = inject_adapter_in_model(cls(**config, target_modules=["0"], init_weights=False), model)
        if factored:
            assert ly.factored_forward(model) == 1
        models.append(model)
    x = torch.randn(3, 5, 128, requires_grad=True)
    peft_out = models[0](x)
    peft_cls = type(models[0][0])
    assert type(models[1][0]).__mro__[1] is peft_cls  # ours: a subclass of peft's layer
    original = peft_cls._get_delta_activations
    monkeypatch.setattr(peft_cls, "_get_delta_activations", lambda *a, **k: pytest.fail("peft's path ran"))
    ours = models[1](x)
    monkeypatch.setattr(peft_cls, "_get_delta_activations", original)
    assert torch.allclose(ours, peft_out, atol=1e-5), (ours - peft_out).abs().max()
    grads = []
    for model, out in ((models[0], peft_out), (models[1], ours)):
        x.grad = None
        out.square().mean().backward()
        grads.append((x.grad.clone(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert len(grads[0][1]) == len(grads[1][1]) >= 2
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kind,config",
    [
        ("lokr", {"r": 4, "alpha": 8, "decompose_factor": 8}),
        ("lokr", {"r": 64, "alpha": 8, "decompose_factor": 8}),  # whole factors: LyCORIS scales by 1
        ("loha", {"r": 3, "alpha": 6}),
    ],
)
def test_our_files_carry_the_scale_peft_trained_with(kind, config, tmp_path):
    """peft scales by alpha / r; LyCORIS by alpha over the split factor's rank, or 1 for whole
    factors. The written files make both readers apply what peft applied."""
    from lycoris import create_lycoris_from_weights
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    cls = LoKrConfig if kind == "lokr" else LoHaConfig
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(128, 192))
    trained = inject_adapter_in_model(
        cls(**config, target_modules=["0"], init_weights=False), copy.deepcopy(base)
    )
    x = torch.randn(4, 128)
    with torch.no_grad():
        want, plain = trained(x), base(x)
    state = ly.baked(get_peft_model_state_dict(trained), kind, config["alpha"] / config["r"])

    theirs = copy.deepcopy(base)
    save_file(ly.comfy_state_dict(state, kind), str(tmp_path / "lycoris.safetensors"))
    network, _ = create_lycoris_from_weights(1.0, str(tmp_path / "lycoris.safetensors"), theirs)
    network.apply_to()
    ours = copy.deepcopy(base)
    ly.load_adapter(ours, state, "ours")  # the diffusers file's peft names, no alpha tensors
    with torch.no_grad():
        assert (want - plain).abs().max() > 1e-2
        assert torch.allclose(theirs(x), want, atol=1e-5), (theirs(x) - want).abs().max()
        assert torch.allclose(ours(x), want, atol=1e-5), (ours(x) - want).abs().max()


def test_lycoris_settings_are_checked_together():
    with pytest.raises(SpecError) as err:
        parse_spec(
            {
                "model": "flux-dev",
                "mode": "full",
                "lora": {"type": "lokr", "dropout": 0.1, "factor": 0},
                "speed": {"fuse_qkv": "on", "fp8_base": "on"},
            }
        )
    text = "\n".join(err.value.problems)
    assert "lora.factor" in text and "0 is no factor" in text
    with pytest.raises(SpecError) as err:
        parse_spec(
            {
                "model": "flux-dev",
                "mode": "full",
                "lora": {"type": "loha", "dropout": 0.1},
                "speed": {"fuse_qkv": "on", "fp8_base": "on"},
            }
        )
    problems = err.value.problems
    assert any(p.startswith("lora.type: loha needs mode lora") for p in problems), problems
    assert any(p.startswith("lora.dropout: for type lora") for p in problems), problems
    assert any(p.startswith("speed.fuse_qkv") and "loha" in p for p in problems), problems
    assert any(p.startswith("speed.fp8_base") and "loha" in p for p in problems), problems

    from client.pricing import work_units

    plain = parse_spec({"model": "flux-dev"})
    lokr = parse_spec({"model": "flux-dev", "lora": {"type": "lokr"}})
    assert work_units(lokr) == pytest.approx(1.2 * work_units(plain))


def test_a_lokr_resumes_as_an_uninterrupted_run(tiny_weights, sample_dataset, tmp_path):
    import contextlib
    import io

    from train.checkpoint import CheckpointError
    from train.loop import run_training

    fields = {"lora.type": "lokr", "lora.factor": 4, "lora.alpha": 8}
    spec = quick_spec(tiny_weights, "flux-dev", steps=6, checkpoint_interval=3, **fields)
    straight, _ = train_quietly(spec, sample_dataset, tmp_path / "straight")
    ckpt = tmp_path / "straight" / "checkpoints" / "step-000003"
    with contextlib.redirect_stdout(io.StringIO()):
        resumed = run_training(spec, sample_dataset, tmp_path / "resumed", resume_from=ckpt)
    a, b = load_file(str(straight.lora_file)), load_file(str(resumed.lora_file))
    assert any(".lokr_w1" in k for k in a)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6

    plain = quick_spec(tiny_weights, "flux-dev", steps=6)
    with pytest.raises(CheckpointError, match="lora"):
        run_training(plain, sample_dataset, tmp_path / "other", resume_from=ckpt)
