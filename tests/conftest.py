"""Shared fixtures: tiny pipelines written once per session, the sample dataset, a train helper."""

from __future__ import annotations

import contextlib
import io
import os
import zipfile
from pathlib import Path

import pytest

from train.families import MODEL_IDS, model_info

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATASET = ROOT / "examples" / "sample-dataset"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each (set before torch loads, inherited
    # by the Cog servers and trainers they start). The tiny models gain little from a second
    # thread, and OpenMP threads spinning against the other worker's cost more than they give.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


# The files that take longest, longest first (summed --durations=0 figures of a full run). `make test` runs
# whole files per worker (--dist loadfile) in collection order (--no-loadscope-reorder: xdist's own
# order puts the files with the most tests first, so these few-but-slow ones came last and the run
# ended with one worker on a long file and the other idle). A file not listed keeps its place after them.
LONG_FILES = (
    "test_family_contract.py",  # every image model through the Cog train entry
    "test_web.py",  # a real browser, trainings through the real Cog server
    "test_family_video.py",  # every video model through the Cog train entry
    "test_resume_cloud.py",
    "test_cog_families.py",
    "test_cog.py",
    "test_hub_publish.py",
    "test_fp8.py",
    "test_speed.py",
    "test_client_cli.py",
    "test_shapes.py",
    "test_ddp.py",
    "test_zygote.py",  # trainings forked from a warm process, one canceled
    "test_preservation.py",
    "test_masked_loss.py",
    "test_ema.py",
    "test_autocaption.py",
    "test_lycoris.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order kept


# The models whose stock pipeline VAE-encodes the control image at about one megapixel (Qwen-Image-Edit
# resizes it so, whatever the render size). On a CPU without bf16 units (no AVX512-BF16 or AMX, as
# here) torch's bf16 conv3d is ~20x slower than fp32: the tiny 3D VAE encodes 1 MP in 2.5 s in fp32
# and 49.8 s in bf16, so each bf16 render costs about a minute. Their suite runs stay fp32; their
# bf16 path is the rest of the Qwen-Image family's, which runs in bf16.
SLOW_IN_BF16_ON_A_CPU = frozenset(m for m in MODEL_IDS if model_info(m).family == "qwen_image_edit")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """Every registered model's tiny pipeline (tiny-flux-dev, tiny-sdxl, ...), by the project's generator."""
    from train.tiny import write_all

    out = tmp_path_factory.mktemp("weights")
    write_all(out)
    return out


@pytest.fixture(scope="session")
def sample_dataset() -> Path:
    return SAMPLE_DATASET


@pytest.fixture(scope="session")
def pair_dataset(tmp_path_factory) -> Path:
    """Six before/after pairs for edit models: grey square (pair_NN_control.png) -> red square
    (pair_NN.png), instruction "make the square red" (train/sample_data.py)."""
    from train.sample_data import write_pair_dataset

    out = tmp_path_factory.mktemp("pairs")
    write_pair_dataset(out)
    return out


def quick_spec(tiny_weights: Path, model: str = "flux-dev", **fields):
    """A spec for a few-second CPU run on a tiny model; ``fields`` override (dotted keys allowed)."""
    from train.families import model_info
    from train.spec import parse_spec

    base = model_info(model).tiny_name
    raw = {
        "model": model,
        "base_weights": str(tiny_weights / base),
        "steps": 6,
        "resolutions": "64",
        "learning_rate": 2e-3,
        "caption_dropout": 0.0,
        "seed": 7,
        "validation": {"num_inference_steps": 2},
    }
    return parse_spec(raw, **fields)


def stock_sdxl(folder: Path, prompt: str = "sks, a red circle"):
    """The stock SDXL pipeline's render from ``folder`` at 64 px (2 steps, guidance 5, seed 3), as
    8-bit RGB ints: what the run entry's renders of the same request are compared with."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    out = pipe(prompt, num_inference_steps=2, height=64, width=64, guidance_scale=5.0, generator=generator)
    return np.asarray(out.images[0].convert("RGB")).astype(int)  # pyright: ignore[reportAttributeAccessIssue]


# The run entry's inputs the tests render with (the Cog prediction's, and RenderRequest's fields)
RENDER_INPUT = {
    "prompt": "sks, a red circle",
    "aspect_ratio": "custom",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "seed": 3,
    "output_format": "png",
}


def render_request(**fields):
    """RENDER_INPUT as the run entry's request; ``fields`` override."""
    from train.inference import RenderRequest

    return RenderRequest(**{**RENDER_INPUT, **fields})


def run_entry_render(model: str, base: Path, weights: Path | None, cache: Path, monkeypatch, control=None):
    """The run entry's render (predict.py's session) of "sks, a red circle" at 64 px (2 steps, seed
    3), with ``weights`` (an output folder or file) or the plain base, as 8-bit RGB ints; ``control``:
    the input image an edit model takes."""
    import numpy as np
    from PIL import Image

    from train.inference import InferenceSession

    monkeypatch.setenv("ADVANCED_TRAINER_RUN_MODEL", model)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_BASE", str(base))
    images: tuple[str, ...] = ()
    if control is not None:  # Cog hands the run entry a file
        cache.mkdir(parents=True, exist_ok=True)
        control.save(cache / "control.png")
        images = (str(cache / "control.png"),)
    request = render_request(input_images=images)
    session = InferenceSession(str(weights) if weights else None, log=lambda _: None, cache_dir=cache)
    with Image.open(session.predict(request, cache / "out")[0]) as img:
        return np.asarray(img.convert("RGB")).astype(int)


def stock_render(
    model: str,
    base: Path,
    lora_dir: Path | None = None,
    weight_name: str | None = None,
    dtype=None,
    control=None,
    prompt: str = "sks, a red circle",
):
    """What a user gets from the model's stock diffusers pipeline (and ``load_lora_weights``): a 64 px
    render (2 steps, seed 3, the model card's guidance) as 8-bit RGB ints; ``control``: the image an
    edit model takes. A modular pipeline (FLUX.3) is loaded as its blocks' documentation says, the
    prompt upsampler popped to encode the prompt as given, its CFG scale set on its guider."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline, ModularPipeline

    from train.models import family_class

    info = model_info(model)
    dtype = dtype or torch.float32
    modular = info.pipeline.endswith("ModularPipeline")
    if modular:
        blocks = ModularPipeline.from_pretrained(str(base)).blocks
        blocks.sub_blocks.pop("prompt_upsampler")
        pipe = blocks.init_pipeline(str(base))
        pipe.load_components(dtype=dtype)
    else:
        pipe = DiffusionPipeline.from_pretrained(base, dtype=dtype)
    assert type(pipe).__name__ == info.pipeline
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, **({"weight_name": weight_name} if weight_name else {}))
    kw = {"max_sequence_length": info.text_tokens} if info.max_text_tokens else {}
    kw.update(family_class(model).guidance_kwargs(info.render_guidance, ""))  # as the model card renders
    if modular:  # a modular pipeline's CFG scale is its guider's (a distilled one has none)
        scale = kw.pop("guidance_scale")
        if pipe.components.get("guider") is not None:
            pipe.update_components(guider=pipe.guider.new(guidance_scale=scale))
    if control is not None:  # the image arguments the model's pipeline takes (Kontext: max_area too)
        kw.update(family_class(model).run_image_inputs([control], 64, 64, 16))
    torch.manual_seed(3)  # as the run entry seeds a scheduler that draws from the global generator
    call = dict(
        prompt=prompt, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(3)
    )
    image = pipe(**call, **kw, output="images")[0] if modular else pipe(**call, **kw).images[0]
    return np.asarray(image.convert("RGB")).astype(int)


def assert_rows_predict_as_alone(family, texts: list[dict], controls: list | None = None) -> None:
    """A batch of items whose prompts have different lengths (zero-padded to the longest, as the
    cache's collate stacks them) predicts each item as a batch of that item alone does: same
    target latents, noise and noise level (each row's share of one global draw)."""
    import torch

    from train.cache import _stack_rows
    from train.models.base import Batch, BatchRandom

    n = len(texts)
    mean = torch.randn(n, *family.encode_images(torch.zeros(1, 3, 64, 64))[0].shape[1:])

    def batch(rows: slice, text: dict) -> Batch:
        rng = BatchRandom(torch.Generator().manual_seed(5), n, rows.start, rows.stop, torch.device("cpu"))
        kept = [c[rows] for c in controls or []]
        return Batch(
            mean[rows], torch.zeros_like(mean[rows]), text, torch.zeros(rows.stop - rows.start, 6), rng, kept
        )

    together, _ = family.prediction(
        family.denoiser, batch(slice(0, n), {k: _stack_rows([t[k] for t in texts]) for k in texts[0]})
    )
    for i, text in enumerate(texts):
        alone, _ = family.prediction(
            family.denoiser, batch(slice(i, i + 1), {k: v[None] for k, v in text.items()})
        )
        torch.testing.assert_close(together[i : i + 1], alone, msg=f"row {i}")


def train_quietly(spec, data: Path, out: Path):
    """Run a training job with its progress lines captured; returns (result, log text)."""
    from train.loop import run_training

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = run_training(spec, data, out)
    return result, buf.getvalue()


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (moto's standalone server, IAM auth enforced) on loopback."""
    import s3server

    server = s3server.start()
    try:
        yield server
    finally:
        server.stop()


# -- the real Cog server with the tiny models (shared by the Cog package's and the client's tests) --


@pytest.fixture(scope="session")
def cog_weights(tiny_weights) -> Path:
    from train.weights import write_manifest

    write_manifest(tiny_weights)
    return tiny_weights


@pytest.fixture(scope="session")
def sample_zip(tmp_path_factory, sample_dataset) -> Path:
    out = tmp_path_factory.mktemp("zips") / "sample.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(sample_dataset.iterdir()):
            zf.write(p, f"my-dataset/{p.name}")  # one nested top folder, as people zip them
    return out


@pytest.fixture(scope="session")
def clip_zip(tmp_path_factory) -> Path:
    """Six tiny captioned clips (``train.sample_data --clips``) and one still, zipped in a nested top
    folder: what a video model's user uploads."""
    from train.sample_data import draw_example, write_clip_dataset

    folder = tmp_path_factory.mktemp("clips") / "my-clips"
    write_clip_dataset(folder)
    draw_example(0, (64, 64))[0].save(folder / "still.png")
    (folder / "still.txt").write_text("a still frame, sks style\n")
    out = folder.parent / "clips.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, f"my-clips/{p.name}")
    return out


@pytest.fixture(scope="session")
def pair_zip(tmp_path_factory, pair_dataset) -> Path:
    """The before/after pairs as an upload (edit models)."""
    out = tmp_path_factory.mktemp("zips") / "pairs.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(pair_dataset.iterdir()):
            zf.write(p, p.name)
    return out


@pytest.fixture(scope="session")
def jobs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs")


def cog_server_fixture(mode, tmp_path_factory, cog_weights, jobs_dir, args=(), **env):
    from cogserver import CogServer

    server = CogServer(
        mode,
        tmp_path_factory.mktemp("cog"),
        {
            "ADVANCED_TRAINER_WEIGHTS": str(cog_weights),
            "ADVANCED_TRAINER_JOBS_DIR": str(jobs_dir),
            "ADVANCED_TRAINER_RUN_BASE": "tiny-flux-dev",
            "HF_HUB_OFFLINE": "1",
            **env,
        },
        args=tuple(args),
    )
    try:
        server.wait()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def upload_sink():
    """The file store Cog uploads outputs to (``--upload-url``), as on Replicate."""
    from cogserver import UploadSink

    sink = UploadSink()
    yield sink
    sink.close()


@pytest.fixture(scope="session")
def train_server(tmp_path_factory, cog_weights, jobs_dir, upload_sink):
    yield from cog_server_fixture(
        "train", tmp_path_factory, cog_weights, jobs_dir, args=("--upload-url", upload_sink.upload_url)
    )


class RunServers:
    """Run-mode Cog servers (predict.py), one per COG_WEIGHTS value, started on first use and kept
    for the session: what Replicate does with a destination version (None: the trainer's own)."""

    def __init__(self, tmp_path_factory, cog_weights, jobs_dir):
        self.args = (tmp_path_factory, cog_weights, jobs_dir)
        self.cache = tmp_path_factory.mktemp("lora-cache")
        self.servers: dict = {}

    def get(self, weights: str | None):
        if weights not in self.servers:
            env = {"ADVANCED_TRAINER_LORA_CACHE": str(self.cache)}
            if weights:
                env["COG_WEIGHTS"] = weights
            gen = cog_server_fixture("run", *self.args, **env)
            self.servers[weights] = (gen, next(gen))
        return self.servers[weights][1]

    def url_for(self, weights: str | None) -> str:
        return self.get(weights).url

    def close(self) -> None:
        for _, server in self.servers.values():  # all exit together, not one graceful shutdown after another
            server.terminate()
        for gen, _ in self.servers.values():
            gen.close()


@pytest.fixture(scope="session")
def run_servers(tmp_path_factory, cog_weights, jobs_dir):
    pool = RunServers(tmp_path_factory, cog_weights, jobs_dir)
    yield pool
    pool.close()


def tiny_spec(model: str = "flux-dev", **extra) -> str:
    """A spec JSON for a few-second training of a tiny model through the Cog train entry."""
    import json

    base = f"tiny-{model}"
    if model == "sdxl":
        extra.setdefault("lora", {"targets": ["to_q", "to_k", "to_v", "to_out.0", "conv_out"]})
    return json.dumps(
        {
            "base_weights": base,
            "resolutions": "64",
            "learning_rate": 0.01,
            "caption_dropout": 0,
            "validation": {"num_inference_steps": 2},
            **extra,
        }
    )


def _train_once(train_server, sample_zip, model: str) -> str:
    from cogserver import data_uri

    r = train_server.post(
        "/trainings",
        {
            "input": {
                "dataset": data_uri(sample_zip),
                "spec": tiny_spec(model),
                "model": model,
                "steps": 6,
                "lora_rank": 8,
                "trigger_word": "sks",
                "validation_prompts": "a red circle",
            }
        },
    )
    body = r.json()
    assert body["status"] == "succeeded", body.get("error") or body.get("logs", "")[-2000:]
    return body["output"]


@pytest.fixture(scope="session")
def flux_weights(train_server, sample_zip) -> str:
    """The URL (in the upload sink) of a tiny Flux LoRA training's output.zip."""
    return _train_once(train_server, sample_zip, "flux-dev")


@pytest.fixture(scope="session")
def sdxl_weights(train_server, sample_zip) -> str:
    return _train_once(train_server, sample_zip, "sdxl")
