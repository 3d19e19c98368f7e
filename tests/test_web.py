"""The web page ("Cloud tab") served by `advanced-trainer serve`, driven in Debian's Chromium with
Playwright against the Replicate fake and the real Cog servers: validate, pack size, submit, the
live jobs list, a finished job's images, "try it" (the destination's new version renders),
cancel; errors in words beside their controls; pages from another origin cannot act;
screenshots of every view in test-artifacts/screenshots/."""

from __future__ import annotations

import json
import os
import re

import pytest
from playwright.sync_api import expect  # noqa: E402

from fake_replicate import FakeReplicate  # noqa: E402
from webpage import CHROMIUM, Browser, LocalServer, OtherOrigin, shot  # noqa: E402

if not os.path.exists(CHROMIUM):  # `make test` installs it; a silent skip would hide the page's tests
    raise RuntimeError(f"no Chromium at {CHROMIUM}: run `make test` (it installs Debian's chromium)")

TOKEN = "r8_" + "W3bPageT0k" * 4
TINY_SPEC = {
    "base_weights": "tiny-flux-dev",
    "resolutions": "64",
    "steps": 8,
    "learning_rate": 0.01,
    "caption_dropout": 0,
    "trigger_word": "sks",
    "validation": {"num_inference_steps": 2},
}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("web") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPLICATE_API_TOKEN", TOKEN)
        mp.setenv("ADVANCED_TRAINER_HOME", str(root))
        mp.setenv("REPLICATE_POLL_INTERVAL", "0.1")
        mp.setenv("ADVANCED_TRAINER_STATUS_URL", "http://127.0.0.1:9/status.json")  # offline: "unknown"
        yield root


@pytest.fixture(scope="module")
def fake(home, train_server, run_servers):
    with FakeReplicate(
        cog_train_url=train_server.url, cog_run_for=run_servers.url_for, token=TOKEN, webhook_throttle_s=0.2
    ) as f:
        yield f


@pytest.fixture(scope="module")
def local(home, fake):
    server = LocalServer(home, fake.url)
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


@pytest.fixture()
def page(browser, local):
    p = browser.page()
    p.set_default_timeout(15_000)
    resp = p.goto(local.url + "/")
    assert resp is not None and resp.ok
    assert "script-src 'self'" in resp.headers.get("content-security-policy", "")
    # the page has loaded its data: the hardware list and the first jobs poll
    expect(p.locator("#hardware option[value='gpu-l40s']")).to_have_count(1)
    expect(p.locator("#jobs-updated")).to_contain_text("Updated")
    yield p
    p.close()
    problems, browser.problems[:] = list(browser.problems), []
    assert not problems, problems  # no script errors, nothing refused by the CSP


def spec_field(page, text: str) -> None:
    if not page.locator("#advanced").evaluate("d => d.open"):
        page.locator("#advanced summary").click()
    page.locator("#spec-json").fill(text)


def job_row(page, job_id):
    return page.locator(f"#jobs-table tbody tr[data-id='{job_id}']")


def submitted_id(page) -> str:
    expect(page.locator("#submit-msg")).to_contain_text("Submitted job", timeout=60_000)
    return re.search(r"Submitted job (\S+)", page.locator("#submit-msg").inner_text()).group(1)


# -- errors in words, beside their controls -------------------------------------------------------------


def test_bad_spec_fields_and_settings_are_explained_beside_their_controls(page, local):
    # a bad field typed in the form: its message appears beside it, and the field is marked invalid
    page.locator("#spec-steps").fill("0")
    expect(page.locator("#err-steps")).to_contain_text("greater than or equal to 1")
    expect(page.locator("#spec-steps")).to_have_attribute("aria-invalid", "true")
    page.locator("#spec-rank").fill("0")
    expect(page.locator("#err-lora\\.rank")).to_contain_text("greater than or equal to 1")
    page.locator("#spec-resolutions").fill("100")
    expect(page.locator("#err-resolutions")).to_contain_text("multiple of 16")
    # a field that is not on the form (from the JSON) goes to the general message area
    spec_field(page, json.dumps({"optimizer": "sgd", "lora": {"dropout": 2}}))
    expect(page.locator("#spec-general")).to_contain_text("optimizer")
    expect(page.locator("#spec-general")).to_contain_text("lora.dropout")
    expect(page.locator("#err-steps")).to_contain_text("greater than or equal to 1")  # still beside steps
    expect(page.locator("#spec-ok")).to_be_empty()
    expect(page.locator("#estimate-out")).to_contain_text("once the spec is valid")
    shot(page.locator("#submit"), "submit-form-with-validation-messages")

    # a submit with a bad spec is refused, in words, and nothing is created
    page.locator("#dataset-path").fill("/no/such/folder")
    page.locator("#dataset-check").click()
    expect(page.locator("#dataset-error")).to_contain_text("does not exist")
    page.locator("#submit-btn").click()
    expect(page.locator("#submit-msg")).to_contain_text("Fix the spec first")
    assert local.state.store.list(limit=5) == []

    # fixing the fields clears the messages; an invalid JSON text is reported beside the textarea
    page.locator("#spec-steps").fill("")
    page.locator("#spec-rank").fill("")
    page.locator("#spec-resolutions").fill("")
    spec_field(page, '{"steps": 10,}')
    expect(page.locator("#err-spec")).to_contain_text("Not valid JSON")
    # a LoKr refuses a full fine-tune: the message sits beside the adapter control
    page.locator("#spec-adapter").select_option("lokr")
    spec_field(page, '{"steps": 10, "mode": "full"}')
    expect(page.locator("#err-lora\\.type")).to_contain_text("lokr needs mode lora")
    spec_field(page, '{"steps": 10}')
    expect(page.locator("#spec-ok")).to_contain_text("lokr rank 16")
    page.locator("#spec-adapter").select_option("")
    expect(page.locator("#spec-ok")).to_contain_text("Spec OK")
    expect(page.locator("#spec-ok")).not_to_contain_text("lokr")
    expect(page.locator("#err-steps")).to_be_empty()
    expect(page.locator("#spec-general")).to_be_empty()
    expect(page.locator("#estimate-out")).to_contain_text("Estimated")

    # settings: a bad IP range and a bad URL get the server's words beside each field; nothing is saved
    before = local.http.get("/api/cloud/providers/replicate").json()["settings"]
    page.locator("#allowed-ips").fill("127.0.0.1/32\n999.1.1.1")
    page.locator("#public-url").fill("ftp://example.com")
    page.locator("#webhook-form button[type=submit]").click()
    expect(page.locator("#err-webhook_allowed_ips")).to_contain_text(
        "'999.1.1.1' is not an IP address or range"
    )
    expect(page.locator("#err-public_url")).to_contain_text("expected an http(s) URL")
    expect(page.locator("#webhook-msg")).to_contain_text("Not saved")
    expect(page.locator("#allowed-ips")).to_have_attribute("aria-invalid", "true")
    assert local.http.get("/api/cloud/providers/replicate").json()["settings"] == before
    # the spend limit: saved, shown, removed
    page.locator("#spend-amount").fill("25")
    page.locator("#spend-period").select_option("weekly")
    page.locator("#spend-action").select_option("warn")
    page.locator("#spend-form button[type=submit]").click()
    expect(page.locator("#spend-msg")).to_have_text("Spend limit saved.")
    expect(page.locator("#spend-current")).to_contain_text("$25.00 per week")
    assert local.http.get("/api/cloud/spend-limit").json()["spend_limit"] == {
        "amount_usd": 25.0,
        "period": "weekly",
        "action": "warn",
    }
    shot(page.locator("#settings"), "settings-with-errors")
    page.locator("#spend-clear").click()
    expect(page.locator("#spend-msg")).to_have_text("Spend limit removed.")
    assert local.http.get("/api/cloud/spend-limit").json()["spend_limit"] is None
    # a good webhook setting saves
    page.locator("#allowed-ips").fill("127.0.0.1/32")
    page.locator("#public-url").fill(local.url)
    page.locator("#webhook-form button[type=submit]").click()
    expect(page.locator("#webhook-msg")).to_have_text("Webhook settings saved.")
    expect(page.locator("#err-webhook_allowed_ips")).to_be_empty()
    assert local.http.get("/api/cloud/providers/replicate").json()["settings"] == before


def test_token_form_and_version_pin(page, local, fake):
    # a malformed token is refused in words; the page never receives a token value
    page.locator("#token-input").fill("r8_short")
    page.locator("#token-form button[type=submit]").click()
    expect(page.locator("#token-error")).not_to_be_empty()
    expect(page.locator("#token-error")).to_have_class(re.compile("is-error"))
    expect(page.locator("#token-status")).to_contain_text("environment")
    # the versions list, pinned and unpinned
    first = page.locator("#versions-list li").first
    expect(first).to_contain_text(fake.trainer_version[:12])
    first.get_by_role("button", name=re.compile("^Pin version")).click()
    expect(page.locator("#versions-msg")).to_contain_text("Pinned")
    assert (
        local.http.get("/api/cloud/providers/replicate").json()["settings"]["version"] == fake.trainer_version
    )
    expect(page.locator("#versions-list li.is-pinned")).to_have_count(1)
    page.locator("#versions-list li.is-pinned").get_by_role("button", name=re.compile("^Unpin")).click()
    expect(page.locator("#versions-msg")).to_contain_text("Unpinned")
    assert local.http.get("/api/cloud/providers/replicate").json()["settings"]["version"] is None
    assert TOKEN not in page.content()


def test_upload_a_zip(page, local, sample_zip):
    page.locator("#dataset-file").set_input_files(str(sample_zip))
    expect(page.locator("#upload-status")).to_contain_text("Uploaded sample.zip")
    path = page.locator("#dataset-path").input_value()
    assert path.endswith(".zip") and path.startswith(str(local.state.root / "uploads"))
    assert open(path, "rb").read() == sample_zip.read_bytes()
    expect(page.locator("#pack-label")).to_contain_text("Zip: ")
    expect(page.locator("#pack-label")).to_contain_text("of the 100 MiB upload limit")
    expect(page.locator("#dataset-error")).to_be_empty()


# -- the whole flow on the real Cog server -------------------------------------------------------------


def test_validate_submit_follow_open_try_and_cancel(page, local, fake, sample_dataset, train_server, browser):
    # provider panel: the account, the token's source, Replicate's status (offline: unknown)
    page.get_by_role("button", name="Validate").click()
    expect(page.locator("#account-out")).to_contain_text("Acme Corp, Inc. (acme)")
    expect(page.locator("#token-status")).to_contain_text("Set (from the environment)")
    expect(page.locator("#replicate-status")).to_contain_text("unknown")
    expect(page.locator("#versions-list li")).to_have_count(1)

    # the dataset folder: the packed size against the 100 MiB limit
    page.get_by_label("Folder or .zip on the server's machine").fill(str(sample_dataset))
    page.get_by_role("button", name="Check size").click()
    expect(page.locator("#pack-label")).to_contain_text("of the 100 MiB upload limit")
    expect(page.locator("#pack-label")).to_contain_text("8 images")
    assert 0 < float(page.locator("#pack-meter").get_attribute("aria-valuenow")) < 100 * 2**20
    # the tiny spec in the JSON textarea; validated, then estimated on the chosen hardware
    spec_field(page, json.dumps(TINY_SPEC))
    expect(page.locator("#spec-ok")).to_contain_text("8 steps")
    expect(page.locator("#estimate-out")).to_contain_text("8 images")
    expect(page.locator("#submit-estimate")).to_contain_text("$")
    shot(page.locator("#provider"), "provider-panel")
    shot(page.locator("#submit"), "submit-form")

    page.get_by_role("button", name="Submit job").click()
    job_id = submitted_id(page)
    row = job_row(page, job_id)
    expect(row).to_be_visible()
    # the list follows the job without a reload, to the end
    page.evaluate("window.__notReloaded = true")
    expect(row.locator(".c-status")).to_have_text("succeeded", timeout=120_000)
    expect(row.locator(".c-progress")).to_contain_text("8 / 8")
    expect(row.locator(".c-cost")).to_contain_text("$")
    assert page.evaluate("window.__notReloaded") is True
    shot(page.locator("#jobs"), "jobs-list")

    # the job view: log, validation images and the loss curve, all really loaded
    row.get_by_role("button", name=job_id).click()
    view = page.locator("#job-view")
    expect(view).to_be_visible()
    expect(page.locator("#job-title")).to_be_focused()
    expect(page.locator("#job-logs")).to_contain_text("PROGRESS")
    expect(page.locator("#job-samples img").first).to_be_visible(timeout=60_000)
    expect(page.locator("#job-loss img")).to_have_count(1)
    page.wait_for_function("""() => {
        const imgs = [...document.querySelectorAll('#job-samples img, #job-loss img')];
        return imgs.length >= 2 && imgs.every(i => i.complete && i.naturalWidth > 0);
    }""")
    expect(page.locator("#job-files a", has_text="pytorch_lora_weights.safetensors")).to_have_count(1)
    expect(page.locator("#job-cancel")).to_be_hidden()
    href = page.locator("#job-files a", has_text="pytorch_lora_weights.safetensors").get_attribute("href")
    assert local.http.get(href).status_code == 200
    shot(view, "job-view-finished")

    # try it: the destination's new version renders the prompt (the trigger word is filled in)
    expect(page.locator("#job-details")).to_contain_text("training → acme/sks-flux-dev")
    expect(page.locator("#try-prompt")).to_have_value("a photo of sks")
    page.locator("#try-prompt").fill("")
    page.get_by_role("button", name="Render").click()
    expect(page.locator("#err-try-prompt")).to_contain_text("Write a prompt")
    expect(page.locator("#try-prompt")).to_have_attribute("aria-invalid", "true")
    page.locator("#try-prompt").fill("sks, a red circle")
    page.get_by_label("Number of images").select_option("2")
    page.get_by_label("Seed (empty: random)").fill("7")
    page.get_by_role("button", name="Render").click()
    expect(page.locator("#try-msg")).to_contain_text("2 images rendered", timeout=120_000)
    expect(page.locator("#try-images img")).to_have_count(2)
    page.wait_for_function("""() => [...document.querySelectorAll('#try-images img')]
        .every(i => i.complete && i.naturalWidth > 0)""")
    assert fake.count("POST", "/v1/predictions") == 1  # one prediction, on the training's new version
    expect(page.locator("#job-files a", has_text="tries/")).to_have_count(0)  # not listed as downloads
    shot(page.locator("#job-try"), "job-view-try-it")
    page.locator("#job-close").click()
    expect(view).to_be_hidden()
    expect(row.get_by_role("button", name=job_id)).to_be_focused()

    # a long job: processing, then canceled from its view
    spec_field(page, json.dumps({**TINY_SPEC, "steps": 100000}))
    expect(page.locator("#spec-ok")).to_contain_text("100000 steps")
    page.get_by_role("button", name="Submit job").click()
    long_id = submitted_id(page)
    long_row = job_row(page, long_id)
    expect(long_row.locator(".c-status")).to_have_text("processing", timeout=60_000)
    long_row.get_by_role("button", name=long_id).focus()  # by keyboard this time
    page.keyboard.press("Enter")
    expect(page.locator("#job-title")).to_be_focused()
    expect(page.locator("#job-details")).to_contain_text("processing")
    page.keyboard.press("Tab")  # Close
    page.keyboard.press("Tab")  # Cancel job
    expect(page.get_by_role("button", name="Cancel job")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#job-msg")).to_contain_text("canceled")
    expect(long_row.locator(".c-status")).to_have_text("canceled")
    expect(page.locator("#job-details")).to_contain_text("canceled")
    assert fake.job(long_id)["status"] == "canceled"
    shot(page, "page-full", full_page=True)

    # a narrow window: the same page, readable
    narrow = browser.page(viewport=(390, 844))
    narrow.goto(local.url + "/#jobs")
    expect(job_row(narrow, long_id).locator(".c-status")).to_have_text("canceled")
    shot(narrow.locator("#jobs"), "jobs-list-narrow")
    shot(narrow, "page-narrow", full_page=True)
    narrow.close()
    train_server.wait(timeout=60)  # the Cog server is free again for the other tests


def test_an_edit_job_is_tried_on_an_uploaded_image(page, local, fake, pair_dataset, train_server, tmp_path):
    """An edit model (tiny FLUX.1 Kontext) trained on before/after pairs: its "try it" box asks
    for the image to edit, refuses to render without one, and edits the uploaded image."""
    from train.sample_data import draw_pair

    page.get_by_role("button", name="Validate").click()
    expect(page.locator("#account-out")).to_contain_text("(acme)")
    page.get_by_label("Folder or .zip on the server's machine").fill(str(pair_dataset))
    page.get_by_role("button", name="Check size").click()
    expect(page.locator("#pack-label")).to_contain_text("of the 100 MiB upload limit")
    page.get_by_label("Model", exact=True).select_option("flux1-kontext-dev")  # listed with the edit models
    spec = {**TINY_SPEC, "base_weights": "tiny-flux1-kontext-dev", "steps": 4}
    spec_field(page, json.dumps(spec))
    expect(page.locator("#spec-ok")).to_contain_text("flux1-kontext-dev · 4 steps")
    page.get_by_role("button", name="Submit job").click()
    job_id = submitted_id(page)
    row = job_row(page, job_id)
    expect(row.locator(".c-status")).to_have_text("succeeded", timeout=120_000)
    row.get_by_role("button", name=job_id).click()
    expect(page.locator("#job-samples img").first).to_be_visible(timeout=60_000)  # control | result
    expect(page.locator("#try-image-field")).to_be_visible()
    expect(page.locator("#try-image-label")).to_have_text("Image to edit")
    page.locator("#try-prompt").fill("make the square red")
    page.get_by_role("button", name="Render").click()
    expect(page.locator("#err-try-image")).to_contain_text("Choose the image to edit.")
    before = tmp_path / "before.png"
    draw_pair(77)[0].save(before)
    page.get_by_label("Image to edit").set_input_files(str(before))
    page.get_by_role("button", name="Render").click()
    expect(page.locator("#try-msg")).to_contain_text("1 image rendered", timeout=120_000)
    expect(page.locator("#err-try-image")).to_have_text("")
    page.wait_for_function("""() => [...document.querySelectorAll('#try-images img')]
        .every(i => i.complete && i.naturalWidth > 0)""")
    shot(page.locator("#job-try"), "job-view-try-edit")
    train_server.wait(timeout=60)


def test_a_video_job_plays_its_validation_clip_on_the_page(page, local, fake, train_server, tmp_path):
    """A video model (tiny Wan 2.1) trained on a folder of clips: the page packs the clips, and the job
    view plays the validation render, an H.264 .mp4 served by the local server, in a <video>; its
    "try it" box renders a video of the frame count asked for (a bad count named before sending)."""
    from train.sample_data import write_clip_dataset

    clips = tmp_path / "clips"
    write_clip_dataset(clips, count=3)
    page.get_by_role("button", name="Validate").click()
    expect(page.locator("#account-out")).to_contain_text("(acme)")
    page.get_by_label("Folder or .zip on the server's machine").fill(str(clips))
    page.get_by_role("button", name="Check size").click()
    expect(page.locator("#pack-label")).to_contain_text("of the 100 MiB upload limit")
    page.get_by_label("Model", exact=True).select_option("wan2.1-t2v-1.3b")
    spec = {**TINY_SPEC, "base_weights": "tiny-wan2.1-t2v-1.3b", "steps": 2, "video": {"frames": [9]}}
    spec_field(page, json.dumps(spec))
    expect(page.locator("#spec-ok")).to_contain_text("wan2.1-t2v-1.3b · 2 steps")
    page.get_by_role("button", name="Submit job").click()
    job_id = submitted_id(page)
    row = job_row(page, job_id)
    expect(row.locator(".c-status")).to_have_text("succeeded", timeout=120_000)
    row.get_by_role("button", name=job_id).click()
    video = page.locator("#job-samples video")
    expect(video).to_have_count(1, timeout=60_000)  # the .mp4, not its frame strip as well
    expect(page.locator("#job-samples img")).to_have_count(0)
    expect(page.locator("#job-samples-title")).to_have_text("Validation videos")
    # the browser decodes it: metadata and a first frame loaded, then it plays
    page.wait_for_function(
        "() => { const v = document.querySelector('#job-samples video'); return v && v.readyState >= 2; }",
        timeout=30_000,
    )
    duration = page.evaluate("document.querySelector('#job-samples video').duration")
    assert 0.4 < duration < 0.8, duration  # 9 frames at 16 fps
    page.evaluate("document.querySelector('#job-samples video').play()")
    page.wait_for_function(
        "() => document.querySelector('#job-samples video').currentTime > 0", timeout=30_000
    )
    shot(page.locator("#job-outputs"), "job-view-video")

    # try it: the destination's new version renders a video of the frames asked for, played in place
    expect(page.get_by_label("Frames")).to_be_visible()
    expect(page.locator("#try-frames-help")).to_contain_text("4k+1 up to 81")
    page.get_by_label("Frames").fill("4")
    page.get_by_role("button", name="Render").click()
    expect(page.locator("#err-try-frames")).to_contain_text("4k+1 frames")
    page.get_by_label("Frames").fill("5")
    page.get_by_role("button", name="Render").click()
    expect(page.locator("#try-msg")).to_contain_text("1 video rendered", timeout=120_000)
    page.wait_for_function(
        "() => { const v = document.querySelector('#try-images video'); return v && v.readyState >= 2; }",
        timeout=30_000,
    )
    duration = page.evaluate("document.querySelector('#try-images video').duration")
    assert 0.2 < duration < 0.45, duration  # 5 frames at 16 fps
    train_server.wait(timeout=60)


def test_beyond_loopback_the_page_logs_in_with_the_api_key(browser, fake, tmp_path):
    from client.server import ensure_api_key

    root = tmp_path / "home"
    key = ensure_api_key(root)
    server = LocalServer(root, fake.url, state_host="0.0.0.0")
    page = browser.page()
    try:
        page.set_default_timeout(15_000)
        page.goto(server.url + "/")
        expect(page.locator("#login")).to_be_visible()
        page.get_by_label("API key").fill("at_wrong")
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("#login-error")).to_contain_text("wrong API key")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("#login")).to_be_hidden()
        expect(page.locator("#hardware option[value='gpu-l40s']")).to_have_count(1)
        expect(page.locator("#jobs-updated")).to_contain_text("Updated")
        assert key not in page.content()
    finally:
        page.close()
        server.close()
        browser.problems.clear()


# -- another origin cannot act ----------------------------------------------------------------------------

ATTACK_JS = """
const target = new URL(location.href).searchParams.get("t");
const tries = [
  ["PUT", "/api/cloud/providers/replicate", {public_url: "https://evil.example", webhook_allowed_ips: ["0.0.0.0/0"]}],
  ["PUT", "/api/cloud/spend-limit", null],
  ["POST", "/api/cloud/jobs/submit", {spec: {}, dataset: "/tmp"}],
  ["POST", "/api/cloud/jobs/JOB/cancel", {}],
  ["PUT", "/api/cloud/providers/replicate/token", {token: "r8_attacker"}],
];
async function go() {
  const out = [];
  for (const [method, path, body] of tries) {
    for (const mode of ["cors", "no-cors"]) {
      try {
        const r = await fetch(target + path, {method, mode, credentials: "include",
          headers: mode === "cors" ? {"content-type": "application/json"} : {"content-type": "text/plain"},
          body: JSON.stringify(body)});
        out.push([method, path, mode, r.type, r.status]);
      } catch (e) {
        out.push([method, path, mode, "error", String(e)]);
      }
    }
  }
  document.title = "done";
  window.results = out;
}
go();
"""


def test_pages_from_another_origin_cannot_change_anything(browser, local):
    before = local.http.get("/api/cloud/providers/replicate").json()
    spend = local.http.get("/api/cloud/spend-limit").json()
    jobs = [j["id"] for j in local.http.get("/api/cloud/jobs").json()["jobs"]]
    other = OtherOrigin("<!doctype html><title>other</title><script src='/attack.js'></script>", ATTACK_JS)
    origins = [
        other.url.rstrip("/"),
        other.url.rstrip("/").replace("127.0.0.1", "localhost"),
    ]  # same-site, cross-site
    first = len(local.seen)
    try:
        page = browser.page()
        for origin in origins:
            page.goto(f"{origin}/?t={local.url}")
            page.wait_for_function("document.title === 'done'")
            results = page.evaluate("window.results")
            assert len(results) == 10
            for method, path, mode, kind, status in results:
                # no answer ever reaches the other page's script
                assert kind in ("error", "opaque"), (method, path, mode, kind, status)
        page.close()
    finally:
        other.close()
    # the simple (no-cors) POSTs did reach the server, which refused each one; nothing else got through
    seen = [r for r in local.seen[first:] if r["origin"] in origins]
    writes = [r for r in seen if r["method"] in ("POST", "PUT", "PATCH", "DELETE")]
    assert {(r["origin"], r["path"]) for r in writes} == {
        (o, p) for o in origins for p in ("/api/cloud/jobs/submit", "/api/cloud/jobs/JOB/cancel")
    }, seen
    assert all(r["status"] == 403 for r in writes), writes
    assert all(r["method"] in ("POST", "PUT", "OPTIONS") for r in seen), (
        seen
    )  # preflights, never answered with CORS
    assert local.http.get("/api/cloud/providers/replicate").json() == before
    assert local.http.get("/api/cloud/spend-limit").json() == spend
    assert [j["id"] for j in local.http.get("/api/cloud/jobs").json()["jobs"]] == jobs
    browser.problems.clear()  # the other page's console noise is not the page under test
