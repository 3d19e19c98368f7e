"""The web page's job view for step selection and carrying jobs on, in Debian's Chromium: a
delivered job shows its contact sheet, says which step it is and why, offers every kept step in
"try it" and a "Continue training" form (resumable jobs); a canceled job offers "Resume", which
submits the linked job. Against the Replicate fake (synthetic runs: what is tested is the page)."""

from __future__ import annotations

import json
import os

import pytest
from playwright.sync_api import expect

from conftest import quick_spec, train_quietly
from fake_replicate import FakeReplicate, SyntheticRun
from webpage import CHROMIUM, Browser, LocalServer, shot

if not os.path.exists(CHROMIUM):  # `make test` installs it; a silent skip would hide the page's tests
    raise RuntimeError(f"no Chromium at {CHROMIUM}: run `make test` (it installs Debian's chromium)")

TOKEN = "r8_" + "St3pPageT0k" * 4


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("web-steps") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPLICATE_API_TOKEN", TOKEN)
        mp.setenv("ADVANCED_TRAINER_HOME", str(root))
        mp.setenv("REPLICATE_POLL_INTERVAL", "0.1")
        mp.setenv("ADVANCED_TRAINER_STATUS_URL", "http://127.0.0.1:9/status.json")
        yield root


@pytest.fixture(scope="module")
def fake(home):
    with FakeReplicate(token=TOKEN, synthetic=SyntheticRun(duration_s=0.3, steps=3, predict_time=5.0)) as f:
        yield f


@pytest.fixture(scope="module")
def jobs(home, fake, tiny_weights, sample_dataset):
    """A delivered, resumable job with kept steps, and a canceled one whose checkpoint went to S3."""
    from client.config import outputs_dir, store_path
    from client.store import JobStore

    spec = quick_spec(tiny_weights, "sdxl", steps=4, resumable=True, **{"validation.interval": 2})
    folder = outputs_dir(home) / "job-ok"
    train_quietly(spec, sample_dataset, folder)
    store = JobStore(store_path(home))
    dataset = f"{fake.url}/v1/files/dataset-1"
    base = {
        "provider": "replicate",
        "kind": "training",
        "hardware": "gpu-l40s",
        "destination": "acme/sks-sdxl",
    }
    store.reserve("rk-ok", {**base, "spec_json": spec.to_json()})
    store.update("rk-ok", input_json={"dataset": dataset})
    weights = f"{fake.url}/_fake/outputs/job-ok/output.zip"
    store.bind("rk-ok", "job-ok", {"id": "job-ok", "status": "succeeded", "output": {"weights": weights}})
    store.update("job-ok", local_dir=str(folder), delivered=True)
    publish = {"s3_bucket": "my-bucket", "s3_prefix": "runs/a"}
    canceled = quick_spec(tiny_weights, "sdxl", steps=40, checkpoint_interval=5, publish=publish)
    store.reserve("rk-stop", {**base, "spec_json": canceled.to_json()})
    store.update("rk-stop", input_json={"dataset": dataset, "return_checkpoint": True})
    logs = "checkpoint: step 5 saved to /x/checkpoints/step-000005\n"
    store.bind("rk-stop", "job-stop", {"id": "job-stop", "status": "canceled", "logs": logs})
    return store


@pytest.fixture(scope="module")
def page(home, fake, jobs):
    server = LocalServer(home, fake.url)
    browser = Browser()
    p = browser.page()
    p.set_default_timeout(15_000)
    p.goto(server.url + "/")
    expect(p.locator("#jobs-updated")).to_contain_text("Updated")
    yield p
    p.close()
    problems = list(browser.problems)
    browser.close()
    server.close()
    assert not problems, problems  # no script errors, nothing refused by the CSP


def test_a_delivered_job_shows_its_contact_sheet_and_offers_every_kept_step(page, jobs):
    page.locator("#jobs-table tbody tr[data-id='job-ok']").get_by_role("button", name="job-ok").click()
    expect(page.locator("#job-selection")).to_be_visible(timeout=30_000)
    expect(page.locator("#job-choice")).to_contain_text("These weights are step 4")
    page.wait_for_function(
        "() => { const i = document.querySelector('#job-sheet-img');"
        " return i && i.complete && i.naturalWidth > 0; }"
    )
    expect(page.locator("#job-sheet-img")).to_have_attribute(
        "alt", "Contact sheet: each validation prompt at each kept step; step 4 is framed"
    )
    options = page.locator("#try-step option")
    expect(options).to_have_count(2)
    assert options.all_inner_texts() == ["2", "4 (chosen)"]
    expect(page.locator("#try-step")).to_have_value("")  # the chosen step: no step input is sent
    expect(page.locator("#job-steps a")).to_have_count(2)  # each kept step's LoRA, under "Which step"
    expect(page.locator("#job-files a", has_text="steps/")).to_have_count(0)
    expect(page.locator("#job-continue")).to_be_visible()
    expect(page.locator("#job-resume")).to_be_hidden()
    shot(page.locator("#job-view"), "job-view-steps")


def test_continue_and_resume_submit_linked_jobs(page, jobs, fake):
    page.locator("#continue-steps").fill("0")
    page.get_by_role("button", name="Continue training").click()
    expect(page.locator("#err-continue-steps")).to_contain_text("1 or more")
    page.locator("#continue-steps").fill("6")
    page.get_by_role("button", name="Continue training").click()
    expect(page.locator("#job-msg")).to_contain_text("Submitted", timeout=30_000)
    child = [j for j in jobs.list(limit=20) if j["parent_id"] == "job-ok"]
    assert len(child) == 1 and child[0]["relation"] == "continue"
    assert json.loads(child[0]["spec_json"])["steps"] == 10
    assert json.loads(child[0]["input_json"])["resume_from"].endswith("/job-ok/output.zip")

    page.locator("#job-close").click()
    page.locator("#jobs-table tbody tr[data-id='job-stop']").get_by_role("button", name="job-stop").click()
    expect(page.locator("#job-resume")).to_be_visible()
    expect(page.locator("#job-continue")).to_be_hidden()
    page.get_by_role("button", name="Resume from the last checkpoint").click()
    expect(page.locator("#job-msg")).to_contain_text("Submitted", timeout=30_000)
    expect(page.locator("#job-details")).to_contain_text("Resumes")
    resumed = [j for j in jobs.list(limit=20) if j["parent_id"] == "job-stop"]
    assert len(resumed) == 1 and resumed[0]["relation"] == "resume"
    inputs = json.loads(resumed[0]["input_json"])
    assert (
        inputs["resume_checkpoint"] == "s3://my-bucket/runs/a/checkpoints"
        and inputs["return_checkpoint"] is True
    )
