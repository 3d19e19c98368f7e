"""train/trained.py: what a weights source (COG_WEIGHTS, lora_weights, extra_lora) holds.

Sources are built here: our output layout (config.json + the diffusers LoRA, or model/ for a full
fine-tune), other trainers' archives, bare .safetensors files, data URIs, URLs on loopback, Hub
references (the Hub is unreachable: the error must say so), and archives that must be refused.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from cogserver import UploadSink
from train.trained import LORA_FILE, TrainedWeightsError, _hf_ref, fetch_trained, lora_family

FLUX_KEYS = [
    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
    "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight",
]
SDXL_KEYS = ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
KOHYA_FLUX = ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]


def lora_bytes(keys) -> bytes:
    return save({k: torch.zeros(2, 2) for k in keys})


def config(model="flux-dev", mode="lora", trigger="sks", base="tiny-flux-dev") -> bytes:
    return json.dumps(
        {
            "trainer": "advanced-trainer",
            "spec": {"model": model, "mode": mode, "trigger_word": trigger, "base_weights": base},
        }
    ).encode()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def data_uri(data: bytes, mime="application/zip") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture()
def sink():
    s = UploadSink()
    yield s
    s.close()


def test_our_output_archive_says_family_base_and_trigger(tmp_path, sink):
    url = sink.put(
        "output.zip",
        zip_bytes(
            {
                "my-run/config.json": config(),
                f"my-run/{LORA_FILE}": lora_bytes(FLUX_KEYS),
                "my-run/lora_kohya.safetensors": lora_bytes(KOHYA_FLUX),
                "my-run/samples/step-1-0.png": b"png",
            }
        ),
    )
    t = fetch_trained(url, tmp_path, field="COG_WEIGHTS")
    assert (t.model, t.base_weights, t.trigger_word, t.family) == ("flux-dev", "tiny-flux-dev", "sks", "flux")
    assert t.lora_file.name == LORA_FILE and t.model_dir is None and t.config["trainer"] == "advanced-trainer"
    # fetched once: the same source again is read from the cache, even with the file gone upstream
    sink.files.clear()
    assert fetch_trained(url, tmp_path, field="COG_WEIGHTS").lora_file == t.lora_file


def test_a_full_fine_tune_replaces_the_base(tmp_path):
    t = fetch_trained(
        data_uri(zip_bytes({"config.json": config(mode="full"), "model/model_index.json": b"{}"})),
        tmp_path,
        field="lora_weights",
    )
    assert t.model_dir.name == "model" and t.lora_file is None
    with pytest.raises(
        TrainedWeightsError, match="lora_weights: .*full fine-tune without model/model_index.json"
    ):
        fetch_trained(
            data_uri(zip_bytes({"config.json": config(mode="full")})), tmp_path, field="lora_weights"
        )


def test_a_published_full_fine_tune_is_fetched_from_its_pointer_and_checked(tmp_path):
    from cogserver import FileServer
    from train.published import FORMAT, PublishedModelError, fetch_published

    files = {"model_index.json": b"{}", "unet/config.json": b'{"a": 1}'}
    pointer = {
        "format": FORMAT,
        "folder": "model",
        "files": [{"path": k, "size": len(v)} for k, v in files.items()],
        "s3": {"uri": "s3://b/runs/model", "public_url": None},
    }

    def archive(doc) -> str:
        return data_uri(
            zip_bytes({"config.json": config(mode="full"), "published_model.json": json.dumps(doc).encode()})
        )

    for name, content in files.items():  # the bucket behind its public URL
        (tmp_path / "bucket" / "runs" / "model" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "bucket" / "runs" / "model" / name).write_bytes(content)
    server = FileServer(tmp_path / "bucket")
    try:
        doc = {**pointer, "s3": {**pointer["s3"], "public_url": f"{server.url}/runs/model"}}
        t = fetch_trained(archive(doc), tmp_path, field="COG_WEIGHTS")
        assert t.model_dir is None and t.published == doc and "published at" in t.describe()
        folder = fetch_published(doc, tmp_path / "cache", log=lambda _: None)
        assert {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        } == files
        short = {**doc, "files": [{"path": "model_index.json", "size": 3}]}  # the server has 2 bytes
        with pytest.raises(PublishedModelError, match="model_index.json: expected 3 bytes, got 2"):
            fetch_published(short, tmp_path / "cache", log=lambda _: None)
    finally:
        server.close()
    escape = {**pointer, "files": [{"path": "../../etc/passwd", "size": 1}]}  # a hostile pointer
    with pytest.raises(TrainedWeightsError, match="not a published-model pointer"):
        fetch_trained(archive(escape), tmp_path / "other", field="COG_WEIGHTS")


def test_other_trainers_archives_and_bare_files(tmp_path):
    buf = io.BytesIO()  # replicate/flux-fine-tuner's layout: a tar with one LoRA somewhere inside
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = lora_bytes(FLUX_KEYS)
        info = tarfile.TarInfo("output/flux_train_replicate/lora.safetensors")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    t = fetch_trained(data_uri(buf.getvalue(), "application/gzip"), tmp_path, field="lora_weights")
    assert (t.model, t.base_weights, t.lora_file.name) == ("flux-dev", None, "lora.safetensors")

    sdxl = fetch_trained(
        data_uri(lora_bytes(SDXL_KEYS), "application/octet-stream"), tmp_path, field="extra_lora"
    )
    assert sdxl.model == "sdxl"
    again = fetch_trained(
        data_uri(lora_bytes(SDXL_KEYS), "application/octet-stream"), tmp_path, field="extra_lora"
    )
    assert again.lora_file == sdxl.lora_file  # the same source is kept, not fetched twice
    schnell = fetch_trained(
        data_uri(lora_bytes(KOHYA_FLUX)), tmp_path, field="extra_lora", default_model="flux-schnell"
    )
    assert schnell.model == "flux-schnell"  # a Flux LoRA on a schnell container renders on schnell

    with pytest.raises(
        TrainedWeightsError,
        match=r"lora_weights: .* holds 2 \.safetensors files \(a\.safetensors, "
        r"b\.safetensors\)",
    ):
        fetch_trained(
            data_uri(
                zip_bytes({"a.safetensors": lora_bytes(FLUX_KEYS), "b.safetensors": lora_bytes(FLUX_KEYS)})
            ),
            tmp_path,
            field="lora_weights",
        )


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"just some bytes, not weights", "neither a .safetensors LoRA nor a zip/tar archive"),
        (zip_bytes({"../../evil.safetensors": b"x"}), "cannot unpack"),
        (
            zip_bytes({"config.json": config(model="sd15"), LORA_FILE: lora_bytes(FLUX_KEYS)}),
            "trained for 'sd15'",
        ),
        (zip_bytes({"config.json": config()}), f"has a config.json but no {LORA_FILE}"),
    ],
)
def test_unusable_content_is_refused_naming_the_field(tmp_path, content, needle):
    with pytest.raises(TrainedWeightsError) as e:
        fetch_trained(data_uri(content), tmp_path, field="lora_weights")
    assert str(e.value).startswith("lora_weights: ") and needle in str(e.value)
    assert (
        not (tmp_path / "evil.safetensors").exists() and not (tmp_path.parent / "evil.safetensors").exists()
    )


def test_sources_that_cannot_be_fetched(tmp_path, sink):
    with pytest.raises(TrainedWeightsError, match=r"COG_WEIGHTS: .*HTTP 404") as e:
        fetch_trained(f"{sink.url}/files/x/output.zip?X-Amz-Signature=s3cr3t", tmp_path, field="COG_WEIGHTS")
    assert "s3cr3t" not in str(e.value)
    with pytest.raises(TrainedWeightsError, match="lora_weights: .* is not an http"):
        fetch_trained("/etc/passwd", tmp_path, field="lora_weights")  # no local paths from a prediction input
    with pytest.raises(TrainedWeightsError, match="COG_WEIGHTS: .* does not exist"):
        fetch_trained(str(tmp_path / "nope.zip"), tmp_path, field="COG_WEIGHTS", allow_local=True)
    with pytest.raises(
        TrainedWeightsError, match="lora_weights: cannot get someone/lora from the Hugging Face Hub"
    ):
        fetch_trained("someone/lora", tmp_path, field="lora_weights")  # HF_HUB_OFFLINE in tests
    with pytest.raises(TrainedWeightsError, match="lora_weights: the data URI is not valid base64"):
        fetch_trained("data:application/zip;base64,@@@", tmp_path, field="lora_weights")


def test_a_local_cog_weights_path_is_used_in_place(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_bytes(config())
    save_file({k: torch.zeros(2, 2) for k in FLUX_KEYS}, str(folder / LORA_FILE))
    t = fetch_trained(str(folder), tmp_path / "cache", field="COG_WEIGHTS", allow_local=True)
    assert t.lora_file == folder / LORA_FILE


def test_hub_references_and_family_detection(tmp_path):
    assert _hf_ref("someone/my-lora") == ("someone/my-lora", None)
    assert _hf_ref("hf://someone/my-lora/sub/lora.safetensors") == ("someone/my-lora", "sub/lora.safetensors")
    assert _hf_ref("https://huggingface.co/someone/my-lora/blob/main/lora.safetensors") == (
        "someone/my-lora",
        "lora.safetensors",
    )
    assert _hf_ref("https://example.com/someone/my-lora") is None
    p = Path(tmp_path / "x.safetensors")
    for keys, fam in ((FLUX_KEYS, "flux"), (SDXL_KEYS, "sdxl"), (KOHYA_FLUX, "flux"), (["foo.weight"], None)):
        p.write_bytes(lora_bytes(keys))
        assert lora_family(p) == fam
