"""Hardware profiles: one Replicate trainer model per machine type (a model has one hardware
setting). `submit --hardware gpu-h100-8x` trains through the 8xH100 profile's model; the push
script's dry run lists what it would create, set and push, and its real run does it (against the
Replicate fake, with a stand-in `cog`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.cli import EXIT_OK, EXIT_USER, main
from client.config import Settings
from client.profiles import PUSHED_BY_DEFAULT, configured, profile_for
from fake_replicate import FakeReplicate, SyntheticRun

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "r8_" + "Pr0fileTok" * 4
VERSION = "a" * 64


@pytest.fixture(autouse=True)
def client_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ADVANCED_TRAINER_HOME", str(home))
    return home


@pytest.fixture()
def fake(monkeypatch):
    with FakeReplicate(token=TOKEN, synthetic=SyntheticRun(duration_s=0.3, steps=3, predict_time=30.0)) as f:
        monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
        monkeypatch.setenv("REPLICATE_BASE_URL", f.url)
        monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.1")
        yield f


def cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_each_sku_has_a_trainer_model_named_after_its_profile():
    s = Settings()
    assert profile_for(s, "gpu-l40s").model == "simpletuner/advanced-trainer"  # the default hardware
    assert profile_for(s, "gpu-h100").model == "simpletuner/advanced-trainer-h100"
    assert profile_for(s, "gpu-h100-8x").model == "simpletuner/advanced-trainer-h100-8x"
    assert profile_for(s, "gpu-2x-l40s").model == "simpletuner/advanced-trainer-l40s-2x"
    assert profile_for(s, "gpu-a100-large-4x").model == "simpletuner/advanced-trainer-a100-4x"
    mine = Settings(
        model="me/trainer",
        hardware="gpu-h100",
        version="b" * 64,
        profiles={"gpu-8x-l40s": f"me/big:{VERSION}"},
    )
    assert (
        profile_for(mine, "gpu-h100").model == "me/trainer"
        and profile_for(mine, "gpu-h100").version == "b" * 64
    )
    assert (
        profile_for(mine, "gpu-l40s").model == "me/trainer-l40s"
        and profile_for(mine, "gpu-l40s").version is None
    )
    big = profile_for(mine, "gpu-8x-l40s")
    assert (big.model, big.version) == ("me/big", VERSION)
    assert [p.hardware for p in configured(Settings())] == list(
        PUSHED_BY_DEFAULT
    )  # default first, eight in all


def test_profiles_are_set_and_checked_like_every_setting(capsys, client_home):
    code, _, _ = cli(capsys, "config", "set", "profiles", json.dumps({"gpu-h100-8x": "me/eight"}))
    assert code == EXIT_OK
    assert json.loads((client_home / "settings.json").read_text())["profiles"] == {"gpu-h100-8x": "me/eight"}
    code, _, err = cli(
        capsys, "config", "set", "profiles", json.dumps({"gpu-h100-8x": "not a model", "gpu-9x": "a/b"})
    )
    assert code == EXIT_USER and "profiles.gpu-h100-8x" in err and "profiles.gpu-9x" in err


def test_submit_on_8xh100_trains_through_the_8xh100_profile_model(capsys, fake, sample_dataset):
    fake.add_model("simpletuner/advanced-trainer-h100-8x", visibility="public", hardware="gpu-h100-8x")
    version = fake.add_version("simpletuner/advanced-trainer-h100-8x")
    spec = json.dumps({"model": "flux-dev", "steps": 1000, "trigger_word": "sks"})
    code, out, err = cli(
        capsys,
        "--json",
        "submit",
        "--spec",
        spec,
        "--dataset",
        str(sample_dataset),
        "--hardware",
        "gpu-h100-8x",
    )
    assert code == EXIT_OK, err
    job = json.loads(out)["job"]
    assert job["model"] == "simpletuner/advanced-trainer-h100-8x" and job["hardware"] == "gpu-h100-8x"
    remote = fake.job(job["id"])
    assert remote["model"] == "simpletuner/advanced-trainer-h100-8x" and remote["version"] == version
    assert json.loads(remote["input"]["spec"])["steps"] == 1000  # steps stay steps unless asked
    assert "gpu-h100-8x: trainer model simpletuner/advanced-trainer-h100-8x" in err
    assert fake.model_hardware("acme/sks-flux-dev") == "gpu-h100"  # the destination renders on one GPU
    # the same images in fewer steps, asked for and said out loud
    code, out, err = cli(
        capsys,
        "--json",
        "submit",
        "--spec",
        spec,
        "--dataset",
        str(sample_dataset),
        "--hardware",
        "gpu-h100-8x",
        "--scale-steps-to-gpus",
    )
    assert code == EXIT_OK, err
    assert json.loads(fake.job(json.loads(out)["job"]["id"])["input"]["spec"])["steps"] == 125
    assert "steps 1000 -> 125 on 8 GPUs" in err


def test_a_configured_profile_wins_and_a_missing_one_says_how_to_make_it(capsys, fake, sample_dataset):
    fake.add_model("acme/eight", hardware="gpu-h100-8x")
    version = fake.add_version("acme/eight")
    code, _, _ = cli(capsys, "config", "set", "profiles", json.dumps({"gpu-h100-8x": "acme/eight"}))
    assert code == EXIT_OK
    args = ("--json", "submit", "--spec", "{}", "--dataset", str(sample_dataset))
    code, out, err = cli(capsys, *args, "--hardware", "gpu-h100-8x")
    assert code == EXIT_OK, err
    assert fake.job(json.loads(out)["job"]["id"])["version"] == version
    code, _, err = cli(capsys, *args, "--hardware", "gpu-4x-l40s")  # nobody pushed -l40s-4x
    assert code == EXIT_USER and "simpletuner/advanced-trainer-l40s-4x" in err
    assert "push_profiles.py --only gpu-4x-l40s" in err
    code, out, err = cli(capsys, *args)  # the default hardware: the trainer model itself
    assert (
        code == EXIT_OK and fake.job(json.loads(out)["job"]["id"])["model"] == "simpletuner/advanced-trainer"
    )


def push_script(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "push_profiles.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_the_push_scripts_dry_run_lists_what_it_would_create_set_and_push(fake, client_home):
    Settings(model="acme/advanced-trainer").save(client_home)
    fake.add_model("acme/advanced-trainer", hardware="gpu-l40s")
    fake.add_model("acme/advanced-trainer-h100", hardware="gpu-h100")
    r = push_script("--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = {p["hardware"]: p for p in json.loads(r.stdout)["profiles"]}
    assert list(plan) == list(PUSHED_BY_DEFAULT)
    assert plan["gpu-l40s"]["model"] == "acme/advanced-trainer" and plan["gpu-l40s"]["exists"]
    assert "cannot read or set" in plan["gpu-h100"]["hardware_note"] and plan["gpu-h100"]["create"] is None
    assert plan["gpu-h100-8x"]["create"] == {"visibility": "private", "hardware": "gpu-h100-8x"}
    assert plan["gpu-8x-l40s"]["model"] == "acme/advanced-trainer-l40s-8x"
    assert all(p["push"] == f"cog push r8.im/{p['model']}" for p in plan.values())
    assert not [q for q in fake.requests if q.method == "POST"]  # a dry run changes nothing
    human = push_script("--dry-run")
    assert "would create it (private, hardware gpu-h100-8x)" in human.stdout
    assert "would run: cog push r8.im/acme/advanced-trainer-h100-8x" in human.stdout
    # profile models under another owner cannot be created with this token: said, and exit 2
    Settings().save(client_home)
    r = push_script("--dry-run", "--only", "gpu-h100-8x")
    assert r.returncode == 2 and "not this token's account (acme)" in r.stdout


def test_the_push_script_creates_missing_models_with_their_hardware_and_pushes_each(
    fake, client_home, tmp_path
):
    Settings(model="acme/advanced-trainer").save(client_home)
    fake.add_model("acme/advanced-trainer", hardware="gpu-l40s")
    bin_dir, calls = tmp_path / "bin", tmp_path / "cog-calls.txt"
    bin_dir.mkdir()
    (bin_dir / "cog").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "cog").chmod(0o755)
    r = push_script(
        "--only", "gpu-l40s", "--only", "gpu-h100-8x", env_extra={"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    )
    assert r.returncode == 0, r.stderr
    assert fake.model_hardware("acme/advanced-trainer-h100-8x") == "gpu-h100-8x"
    assert calls.read_text().splitlines() == [
        "push r8.im/acme/advanced-trainer",
        "push r8.im/acme/advanced-trainer-h100-8x",
    ]


def test_the_servers_hardware_and_estimates_name_the_profile_model(fake, client_home):
    from fastapi.testclient import TestClient

    from client import server as srv

    Settings(profiles={"gpu-h100-8x": "acme/eight"}).save(client_home)
    app = srv.create_app(srv.State(root=client_home, base_url=fake.url))
    with TestClient(app, base_url="http://127.0.0.1:8080") as http:
        rows = {r["sku"]: r for r in http.get("/api/cloud/providers/replicate/hardware").json()}
        assert rows["gpu-h100-8x"]["trainer_model"] == "acme/eight"
        assert rows["gpu-h100"]["trainer_model"] == "simpletuner/advanced-trainer-h100"
        r = http.post("/api/cloud/estimate", json={"spec": {"steps": 1000}, "hardware": "gpu-h100-8x"})
        est = r.json()["estimates"][0]
        assert est["trainer_model"] == "acme/eight" and est["steps"] == 1000 and est["source"] == "table"
        assert est["same_images_fewer_steps"]["steps"] == 125
        r = http.post("/api/cloud/estimate", json={"spec": {}, "hardware": "gpu-l40s-2x"})
        assert r.status_code == 422 and "did you mean gpu-2x-l40s" in r.text


def test_the_pages_hardware_choice_shows_the_profiles_model(fake, client_home):
    from playwright.sync_api import expect

    from webpage import Browser, LocalServer

    local = LocalServer(client_home, fake.url)
    browser = Browser()
    try:
        page = browser.page()
        page.set_default_timeout(15_000)
        page.goto(local.url + "/")
        expect(page.locator("#hardware option[value='gpu-h100-8x']")).to_have_count(1)
        expect(page.locator("#hardware-model")).to_have_text("Trains with simpletuner/advanced-trainer")
        page.select_option("#hardware", "gpu-h100-8x")
        expect(page.locator("#hardware-model")).to_have_text(
            "Trains with simpletuner/advanced-trainer-h100-8x"
        )
        assert not page.locator("#hardware option[value='gpu-l40s-2x']").count()  # only Replicate's SKUs
        assert not browser.problems, browser.problems
    finally:
        browser.close()
        local.close()
