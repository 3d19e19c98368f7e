"""Parallel, resumable fetches (train/fetch.py) and base-weights archives unpacked while they arrive
(train/weights.py), against a loopback server that serves ranges like a CDN (bench/rangeserver.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

import train.weights as W
from bench.rangeserver import RangeServer, random_file
from train.fetch import RangeStream, fetch_file, probe
from train.http import DownloadError
from train.weights import WeightsError, fetch_weights_archive

PART = 64 << 10


@pytest.fixture
def blob(tmp_path) -> Path:
    return random_file(tmp_path / "blob.bin", 1_000_003)  # not a multiple of the part size


@pytest.fixture(autouse=True)
def no_waits(monkeypatch):
    monkeypatch.setattr(W, "DOWNLOAD_RETRY", dataclasses.replace(W.DOWNLOAD_RETRY, sleep=lambda _: None))


def _ranged(server: RangeServer) -> list[str]:
    return [r for _, r in server.requests if r and r != "bytes=0-0"]


def test_a_file_comes_in_parallel_parts_byte_for_byte(blob, tmp_path):
    with RangeServer({"blob.bin": blob}) as server:
        out = fetch_file(f"{server.url}/blob.bin", tmp_path / "out.bin", connections=4, part_bytes=PART)
        asked = _ranged(server)
    assert out.read_bytes() == blob.read_bytes()
    assert len(asked) == -(-blob.stat().st_size // PART)  # one request per part, none repeated
    assert f"bytes={15 * PART}-{blob.stat().st_size - 1}" in asked  # the last part ends at the last byte
    assert not (tmp_path / "out.bin.part").exists()


def test_a_server_without_ranges_gets_one_stream_and_the_same_bytes(blob, tmp_path):
    with RangeServer({"blob.bin": blob}, ranges=False) as server:
        assert probe(f"{server.url}/blob.bin").ranges is False
        out = fetch_file(f"{server.url}/blob.bin", tmp_path / "out.bin", connections=8, part_bytes=PART)
        streams = [r for r in server.requests if r[1] is None]
    assert out.read_bytes() == blob.read_bytes()
    assert len(streams) == 1  # after the probes (Range: bytes=0-0 answered 200), one stream


def test_a_connection_cut_mid_part_fetches_only_what_is_missing(blob, tmp_path):
    cut = 5 * PART
    with RangeServer({"blob.bin": blob}, cut_at={cut}, cut_after=10_000) as server:
        out = fetch_file(f"{server.url}/blob.bin", tmp_path / "out.bin", connections=4, part_bytes=PART)
        asked = _ranged(server)
    assert out.read_bytes() == blob.read_bytes()
    assert asked.count(f"bytes={cut}-{cut + PART - 1}") == 1
    assert asked.count(f"bytes={cut + 10_000}-{cut + PART - 1}") == 1  # the rest of that part only
    assert len(asked) == -(-blob.stat().st_size // PART) + 1


def test_a_hash_mismatch_is_refused_naming_the_url_without_its_query(blob, tmp_path):
    with RangeServer({"blob.bin": blob}) as server:
        url = f"{server.url}/blob.bin?X-Amz-Signature=secret123"
        with pytest.raises(DownloadError) as e:
            fetch_file(url, tmp_path / "out.bin", sha256="0" * 64, part_bytes=PART)
        good = hashlib.sha256(blob.read_bytes()).hexdigest()
        assert fetch_file(url, tmp_path / "ok.bin", sha256=good, part_bytes=PART).is_file()
    assert "sha256 does not match" in str(e.value) and f"{server.url}/blob.bin" in str(e.value)
    assert "secret123" not in str(e.value)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.bin.part").exists()


def test_the_in_order_stream_keeps_a_bounded_window(blob):
    with RangeServer({"blob.bin": blob}) as server:
        url = f"{server.url}/blob.bin"
        with RangeStream(url, probe(url), connections=3, part_bytes=PART, window=4) as stream:
            data = b"".join(iter(lambda: stream.read(10_000), b""))
            peak = stream.peak_parts
    assert data == blob.read_bytes() and peak <= 4


def _tar(path: Path, files: dict[str, bytes], gz: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_a_base_archive_is_unpacked_while_it_arrives_and_its_hash_checked(tiny_weights, tmp_path, gz):
    name = "pipe.tar.gz" if gz else "pipe.tar"
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz" if gz else "w") as tf:
        tf.add(tiny_weights / "tiny-sdxl", arcname="tiny-sdxl")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with RangeServer({name: archive}) as server:
        W_PART = 32 << 10
        import train.fetch as F

        F_PART, F.STREAM_PART_BYTES = F.STREAM_PART_BYTES, W_PART  # several parts even for a tiny pipeline
        try:
            with pytest.raises(WeightsError, match="sha256 does not match"):
                fetch_weights_archive(f"{server.url}/{name}#sha256={'1' * 64}", tmp_path / "bad")
            assert not list((tmp_path / "bad").glob("tiny-sdxl"))
            names = fetch_weights_archive(f"{server.url}/{name}#sha256={digest}", tmp_path / "weights")
        finally:
            F.STREAM_PART_BYTES = F_PART
        asked = _ranged(server)
    assert names == ["tiny-sdxl"]
    installed = tmp_path / "weights" / "tiny-sdxl"
    for p in (tiny_weights / "tiny-sdxl").rglob("*"):
        if p.is_file():
            assert (installed / p.relative_to(tiny_weights / "tiny-sdxl")).read_bytes() == p.read_bytes()
    assert len(asked) > 2  # streamed in parts, not fetched whole


def test_a_hostile_tar_streamed_in_is_refused_before_a_byte_lands_outside(tmp_path):
    evil = _tar(tmp_path / "evil.tar", {"ok/model_index.json": b"{}", "../escaped.txt": b"x" * 10})
    with RangeServer({"evil.tar": evil}) as server:
        with pytest.raises(WeightsError, match="unsafe archive refused.*escaped") as e:
            fetch_weights_archive(f"{server.url}/evil.tar", tmp_path / "w" / "weights")
    assert "evil.tar" in str(e.value)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not [p for p in (tmp_path / "w" / "weights").rglob("*") if p.is_file()]  # nothing half-unpacked


def test_one_archive_per_base_by_template_or_mapping(tiny_weights, tmp_path, monkeypatch):
    """ADVANCED_TRAINER_BASE_WEIGHTS names one archive per base: the trainer fetches the base its
    spec names when it first needs it (a template with {name}, or a JSON mapping)."""
    import json

    from train.weights import BASE_WEIGHTS_ENV, per_base_source, resolve_base_weights

    with tarfile.open(tmp_path / "tiny-sdxl.tar", "w") as tf:
        tf.add(tiny_weights / "tiny-sdxl", arcname="tiny-sdxl")
    with RangeServer({"bases/tiny-sdxl.tar": tmp_path / "tiny-sdxl.tar"}) as server:
        template = f"{server.url}/bases/{{name}}.tar"
        assert per_base_source(template, "stabilityai/tiny-sdxl") == f"{server.url}/bases/tiny-sdxl.tar"
        assert per_base_source(json.dumps({"tiny-sdxl": "https://x/a.tar"}), "tiny-sdxl") == "https://x/a.tar"
        assert per_base_source(json.dumps({"tiny-sdxl": "https://x/a.tar"}), "other") is None
        assert per_base_source("https://x/all-bases.tar", "tiny-sdxl") is None  # one archive of every base
        monkeypatch.setenv(BASE_WEIGHTS_ENV, template)
        folder = resolve_base_weights("tiny-sdxl", tmp_path / "weights")
        with pytest.raises(WeightsError, match="404"):
            resolve_base_weights("tiny-flux-dev", tmp_path / "weights")
    assert folder == tmp_path / "weights" / "tiny-sdxl" and (folder / "model_index.json").is_file()


def test_a_run_server_boots_from_its_base_s_own_archive_and_logs_its_setup(
    tiny_weights, tmp_path, tmp_path_factory, jobs_dir
):
    """What a destination version does on a cold boot with a per-base archive URL and no token:
    setup fetches the base its training used, unpacking it as it arrives, and renders."""
    import base64

    import numpy as np
    from PIL import Image

    from conftest import cog_server_fixture, stock_sdxl

    with tarfile.open(tmp_path / "tiny-sdxl.tar", "w") as tf:
        tf.add(tiny_weights / "tiny-sdxl", arcname="tiny-sdxl")
    empty = tmp_path / "weights"
    empty.mkdir()
    with RangeServer({"bases/tiny-sdxl.tar": tmp_path / "tiny-sdxl.tar"}) as server:
        gen = cog_server_fixture(
            "run",
            tmp_path_factory,
            tiny_weights,
            jobs_dir,
            ADVANCED_TRAINER_WEIGHTS=str(empty),
            ADVANCED_TRAINER_BASE_WEIGHTS=f"{server.url}/bases/{{name}}.tar",
            ADVANCED_TRAINER_RUN_MODEL="sdxl",
            ADVANCED_TRAINER_RUN_BASE="tiny-sdxl",
        )
        cog = next(gen)
        try:
            inputs = {"prompt": "a red circle", "aspect_ratio": "custom", "width": 64, "height": 64}
            inputs |= {"num_inference_steps": 2, "seed": 3, "output_format": "png"}
            body = cog.post("/predictions", {"input": inputs}).json()
            log = cog.log_path.read_text()
        finally:
            gen.close()
    assert body["status"] == "succeeded", body.get("error")
    assert "fetched and unpacked" in log and "setup: " in log and "base weights" in log and "load" in log
    ours = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(body["output"][0].split(",", 1)[1]))).convert("RGB")
    )
    stock = stock_sdxl(tiny_weights / "tiny-sdxl", "a red circle")
    assert np.abs(ours.astype(int) - stock).max() <= 2


def test_an_empty_file_is_fetched_too(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with RangeServer({"empty.bin": empty}) as server:
        out = fetch_file(f"{server.url}/empty.bin", tmp_path / "out.bin")
    assert out.read_bytes() == b""
