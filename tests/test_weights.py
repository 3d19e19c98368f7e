"""Base weights for setup(): manifest, verification, archive fetch (path and HTTP), prepare_weights."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from train import weights as W
from train.weights import (
    WeightsError,
    fetch_weights_archive,
    load_manifest,
    prepare_weights,
    resolve_base_weights,
    verify_weights,
    write_manifest,
)

NAMES = ["tiny-flux-dev", "tiny-flux-schnell", "tiny-sdxl"]


# --------------------------------------------------------------------------------------------
# fixtures: the tiny pipelines are written once (conftest's session fixture); tests work on copies


@pytest.fixture(scope="module")
def hashed(tiny_weights, tmp_path_factory) -> Path:
    """A read-only reference: the three tiny pipelines with a full (sha256) manifest."""
    d = tmp_path_factory.mktemp("hashed") / "weights"
    for name in NAMES:
        shutil.copytree(tiny_weights / name, d / name)
    write_manifest(d)
    return d


@pytest.fixture
def cache(hashed, tmp_path) -> Path:
    """A private copy of ``hashed`` a test may damage."""
    d = tmp_path / "weights"
    shutil.copytree(hashed, d)
    return d


@pytest.fixture(scope="module")
def archives(hashed, tmp_path_factory) -> dict[str, Path]:
    """tar.gz of flux-dev + sdxl with manifest; zip with one nested wrapper folder and no manifest; junk."""
    d = tmp_path_factory.mktemp("archives")
    tgz = d / "two-models.tar.gz"
    manifest = load_manifest(hashed)
    with tarfile.open(tgz, "w:gz") as tf:
        for name in ("tiny-flux-dev", "tiny-sdxl"):
            tf.add(hashed / name, arcname=name)
        sub = {"version": 1, "models": {n: manifest["models"][n] for n in ("tiny-flux-dev", "tiny-sdxl")}}
        (d / "manifest.json").write_text(json.dumps(sub))
        tf.add(d / "manifest.json", arcname="manifest.json")
    zp = d / "schnell.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        for p in sorted((hashed / "tiny-flux-schnell").rglob("*")):
            if p.is_file():
                zf.write(
                    p, "export/tiny-flux-schnell/" + p.relative_to(hashed / "tiny-flux-schnell").as_posix()
                )
    junk = d / "not-an-archive.tar.gz"
    junk.write_text("<html>this is an error page, not weights</html>\n" * 20)
    evil = d / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        import io

        tf.addfile(info, io.BytesIO(b"x"))
    return {"tgz": tgz, "zip": zp, "junk": junk, "evil": evil}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_server(archives):
    """A ThreadingHTTPServer on 127.0.0.1 serving the archives folder; yields its base URL."""
    handler = functools.partial(_Quiet, directory=str(archives["tgz"].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _no_temp_left(weights_dir: Path) -> bool:
    return not [p for p in weights_dir.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------
# manifest and verify


def test_manifest_round_trip(hashed, tiny_weights, tmp_path):
    data = json.loads((hashed / "manifest.json").read_text())
    assert data["version"] == 1 and sorted(data["models"]) == NAMES
    for name in NAMES:
        files = data["models"][name]["files"]
        on_disk = sorted(
            p.relative_to(hashed / name).as_posix() for p in (hashed / name).rglob("*") if p.is_file()
        )
        assert sorted(files) == on_disk and "model_index.json" in files
        for rel, info in files.items():
            assert info["size"] == (hashed / name / rel).stat().st_size
            assert len(info["sha256"]) == 64
    assert verify_weights(hashed) == [] and verify_weights(hashed, full_hash=True) == []
    assert load_manifest(hashed) == data

    # only some names, sizes only; an existing manifest's other entries are kept
    d = tmp_path / "w"
    shutil.copytree(tiny_weights / "tiny-sdxl", d / "tiny-sdxl")
    shutil.copytree(tiny_weights / "tiny-flux-dev", d / "tiny-flux-dev")
    write_manifest(d, names=["tiny-sdxl"], sha256=False)
    m = load_manifest(d)
    assert list(m["models"]) == ["tiny-sdxl"]
    assert all(info["sha256"] is None for info in m["models"]["tiny-sdxl"]["files"].values())
    write_manifest(d, names=["tiny-flux-dev"], sha256=False)
    assert sorted(load_manifest(d)["models"]) == ["tiny-flux-dev", "tiny-sdxl"]
    assert verify_weights(d, full_hash=True) == []  # no sha256 recorded: sizes only
    with pytest.raises(WeightsError, match="not a diffusers pipeline folder"):
        write_manifest(d, names=["nothing-here"])


def test_verify_catches_missing_folder_missing_file_and_truncation(cache):
    shutil.rmtree(cache / "tiny-sdxl")
    (cache / "tiny-flux-dev" / "scheduler" / "scheduler_config.json").unlink()
    vae = cache / "tiny-flux-schnell" / "vae" / "diffusion_pytorch_model.safetensors"
    size = vae.stat().st_size
    with open(vae, "r+b") as f:
        f.truncate(size - 100)
    problems = verify_weights(cache)
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert f"{cache / 'tiny-sdxl'} is missing" in text
    assert "tiny-flux-dev/scheduler/scheduler_config.json is missing" in text
    assert f"{size - 100} bytes, the manifest says {size}" in text


def test_flipped_byte_is_caught_only_with_full_hash(cache):
    p = cache / "tiny-flux-dev" / "transformer" / "diffusion_pytorch_model.safetensors"
    with open(p, "r+b") as f:
        f.seek(p.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    assert verify_weights(cache) == []
    problems = verify_weights(cache, full_hash=True)
    assert len(problems) == 1 and "transformer/diffusion_pytorch_model.safetensors" in problems[0]
    assert "sha256" in problems[0]


def test_verify_without_manifest_and_with_a_bad_one(tmp_path):
    assert "manifest.json is missing" in verify_weights(tmp_path)[0]
    (tmp_path / "manifest.json").write_text(
        '{"version": 1, "models": {"x": {"files": {"../../etc/passwd": {"size": 1, "sha256": null}}}}}'
    )
    with pytest.raises(WeightsError, match="not a plain relative path"):
        verify_weights(tmp_path)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "train.weights", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_exit_codes(tiny_weights, tmp_path):
    d = tmp_path / "weights"
    shutil.copytree(tiny_weights / "tiny-flux-dev", d / "tiny-flux-dev")
    assert _cli("verify", "--weights-dir", str(d)).returncode == 1  # no manifest yet
    proc = _cli("manifest", "--weights-dir", str(d))
    assert proc.returncode == 0, proc.stderr
    assert "1 models" in proc.stdout and len(load_manifest(d)["models"]["tiny-flux-dev"]["files"]) > 5
    assert _cli("verify", "--weights-dir", str(d)).returncode == 0
    p = d / "tiny-flux-dev" / "text_encoder" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    assert W.main(["verify", "--weights-dir", str(d)]) == 0  # same size: only the hash sees it
    proc = _cli("verify", "--weights-dir", str(d), "--hash")
    assert proc.returncode == 1 and "text_encoder/model.safetensors" in proc.stderr
    p.write_bytes(bytes(data[:-10]))
    proc = _cli("verify", "--weights-dir", str(d))
    assert proc.returncode == 1 and "the manifest says" in proc.stderr
    assert W.main(["manifest", "--weights-dir", str(d), "--no-hash"]) == 0  # re-record the new state
    assert W.main(["verify", "--weights-dir", str(d), "--hash"]) == 0


# --------------------------------------------------------------------------------------------
# fetching archives


def test_fetch_local_tar_gz_and_nested_zip(archives, hashed, tmp_path):
    d = tmp_path / "weights"
    assert fetch_weights_archive(str(archives["tgz"]), d) == ["tiny-flux-dev", "tiny-sdxl"]
    for name in ("tiny-flux-dev", "tiny-sdxl"):
        assert _tree(d / name) == _tree(hashed / name)
    m = load_manifest(d)
    assert (
        m["models"]["tiny-sdxl"] == load_manifest(hashed)["models"]["tiny-sdxl"]
    )  # the archive's own manifest
    assert verify_weights(d, full_hash=True) == []
    assert _no_temp_left(d)

    assert fetch_weights_archive(str(archives["zip"]), d) == [
        "tiny-flux-schnell"
    ]  # export/tiny-flux-schnell/
    assert _tree(d / "tiny-flux-schnell") == _tree(hashed / "tiny-flux-schnell")
    m = load_manifest(d)
    assert sorted(m["models"]) == NAMES  # added to, not replaced
    assert all(i["sha256"] is None for i in m["models"]["tiny-flux-schnell"]["files"].values())  # sizes only
    assert verify_weights(d) == [] and _no_temp_left(d)


def test_fetch_over_http_with_progress(archives, hashed, http_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(W, "_PROGRESS_MIN_BYTES", 0)
    d = tmp_path / "weights"
    assert fetch_weights_archive(f"{http_server}/two-models.tar.gz", d) == ["tiny-flux-dev", "tiny-sdxl"]
    assert _tree(d / "tiny-sdxl") == _tree(hashed / "tiny-sdxl")
    assert verify_weights(d, full_hash=True) == [] and _no_temp_left(d)
    out = capsys.readouterr().out
    pcts = [line for line in out.splitlines() if line.startswith("weights: ") and "%" in line]
    assert pcts and pcts[-1].startswith("weights: 100%") and len(pcts) <= 21, out


def test_fetch_never_overwrites_or_deletes_an_existing_model(archives, tiny_weights, tmp_path, capsys):
    d = tmp_path / "weights"
    shutil.copytree(tiny_weights / "tiny-flux-dev", d / "tiny-flux-dev")
    (d / "tiny-flux-dev" / "model_index.json").write_text('{"mine": true}')
    (d / "tiny-flux-dev" / "my-notes.txt").write_text("keep me")
    before = _tree(d / "tiny-flux-dev")
    assert fetch_weights_archive(str(archives["tgz"]), d) == ["tiny-flux-dev", "tiny-sdxl"]
    assert _tree(d / "tiny-flux-dev") == before
    assert "already exists; left as it is (not overwritten)" in capsys.readouterr().out
    assert (
        "tiny-flux-dev" not in load_manifest(d)["models"]
    )  # the archive's entry would not match this folder
    assert (d / "tiny-sdxl" / "model_index.json").is_file() and _no_temp_left(d)
    # a second fetch of the same archive changes nothing
    sdxl = _tree(d / "tiny-sdxl")
    fetch_weights_archive(str(archives["tgz"]), d)
    assert _tree(d / "tiny-flux-dev") == before and _tree(d / "tiny-sdxl") == sdxl


def test_fetch_errors_name_the_source(archives, http_server, tmp_path, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(W, "DOWNLOAD_RETRY", dataclasses.replace(W.DOWNLOAD_RETRY, sleep=waits.append))
    d = tmp_path / "weights"
    url = f"{http_server}/no-such-weights.tar"
    with pytest.raises(WeightsError, match="404") as e:
        fetch_weights_archive(url, d)
    assert url in str(e.value) and waits == []  # a 404 is final: no retries
    with pytest.raises(WeightsError, match="not a zip, tar or tar.gz") as e:
        fetch_weights_archive(str(archives["junk"]), d)
    assert str(archives["junk"]) in str(e.value)
    with pytest.raises(WeightsError, match="traversal") as e:
        fetch_weights_archive(f"{http_server}/evil.tar", d)
    assert "evil.tar" in str(e.value) and not list(tmp_path.rglob("escaped.txt"))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = f"http://127.0.0.1:{port}/w.tar.gz?X-Signature=secret"
    with pytest.raises(WeightsError, match="refused") as e:
        fetch_weights_archive(refused, d)
    assert f"http://127.0.0.1:{port}/w.tar.gz" in str(e.value) and "secret" not in str(e.value)
    assert len(waits) == W.DOWNLOAD_RETRY.attempts - 1  # a network failure is tried again first
    with pytest.raises(WeightsError, match="no such file"):
        fetch_weights_archive(str(tmp_path / "missing.tar"), d)
    assert not list(d.iterdir())  # nothing left behind


# --------------------------------------------------------------------------------------------
# prepare_weights (what setup() calls)


def test_prepare_all_good(hashed):
    status = prepare_weights(hashed)
    assert sorted(status.models) == NAMES and set(status.origins.values()) == {"cache"}
    assert status.warnings == [] and status.manifest == hashed / "manifest.json"
    assert status.path("someone/tiny-sdxl") == hashed / "tiny-sdxl"
    status = prepare_weights(hashed, required=["tiny-flux-dev"])
    assert status.models["tiny-flux-dev"] == hashed / "tiny-flux-dev"
    assert verify_weights(hashed, full_hash=True) == []  # untouched


def test_prepare_from_tarball_source(archives, http_server, tmp_path):
    d = tmp_path / "weights"
    status = prepare_weights(d, source=f"{http_server}/two-models.tar.gz", required=["tiny-sdxl"])
    assert status.origins == {"tiny-flux-dev": "tarball", "tiny-sdxl": "tarball"}
    # a second setup() in the same container does not download again
    status = prepare_weights(d, source=f"{http_server}/two-models.tar.gz", required=["tiny-sdxl"])
    assert status.origins["tiny-sdxl"] == "cache" and "not fetched" in status.warnings[0]


def test_prepare_required_missing_says_what_to_provide(cache):
    with pytest.raises(WeightsError) as e:
        prepare_weights(cache, required=["black-forest-labs/FLUX.1-dev"])
    msg = str(e.value)
    assert f"base weights missing: {cache / 'FLUX.1-dev'}" in msg
    assert f"put the diffusers folder at {cache / 'FLUX.1-dev'}" in msg
    assert (
        "python -m train.weights manifest" in msg
        and "ADVANCED_TRAINER_BASE_WEIGHTS" in msg
        and "hf_token" in msg
    )
    assert sorted(p.name for p in cache.iterdir()) == sorted(NAMES + ["manifest.json"])  # nothing deleted


def test_prepare_listed_model_missing_or_damaged(cache):
    shutil.rmtree(cache / "tiny-sdxl")
    with pytest.raises(WeightsError) as e:
        prepare_weights(cache)
    assert f"{cache / 'tiny-sdxl'} (listed in {cache / 'manifest.json'})" in str(e.value)
    status = prepare_weights(cache, required=["tiny-flux-dev"])  # not required: a warning only
    assert "tiny-sdxl (not required)" in status.warnings[0]
    p = cache / "tiny-flux-dev" / "vae" / "diffusion_pytorch_model.safetensors"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(
        WeightsError, match="base weights damaged: .*diffusion_pytorch_model.safetensors"
    ) as e:
        prepare_weights(cache, required=["tiny-flux-dev"])
    assert p.exists()  # never deleted


def test_prepare_no_manifest(tmp_path, tiny_weights):
    with pytest.raises(WeightsError, match="no manifest.json and no diffusers pipeline folder") as e:
        prepare_weights(tmp_path / "empty")
    assert "ADVANCED_TRAINER_BASE_WEIGHTS" in str(e.value) and "hf_token" in str(e.value)
    d = tmp_path / "weights"
    shutil.copytree(tiny_weights / "tiny-sdxl", d / "tiny-sdxl")
    status = prepare_weights(d)  # usable, but unchecked: say so
    assert list(status.models) == ["tiny-sdxl"] and "manifest.json is missing" in status.warnings[0]


def test_prepare_hub_unreachable(cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(WeightsError) as e:
        prepare_weights(cache, required=["example-org/not-cached-model"], allow_hub=True, hf_token="hf_dummy")
    msg = str(e.value)
    assert "example-org/not-cached-model" in msg and "hf_token" in msg and "Hub" in msg
    assert "hf_dummy" not in msg
    # without allow_hub the Hub is not tried at all
    with pytest.raises(WeightsError, match="base weights missing") as e:
        prepare_weights(cache, required=["example-org/not-cached-model"])
    assert "download of" not in str(e.value)


def test_resolve_base_weights_unchanged(hashed):
    assert resolve_base_weights("tiny-sdxl", hashed) == hashed / "tiny-sdxl"
    assert resolve_base_weights("some-org/tiny-flux-dev", hashed) == hashed / "tiny-flux-dev"
    with pytest.raises(WeightsError, match="HF_TOKEN"):
        resolve_base_weights("nowhere/not-a-model", hashed)
