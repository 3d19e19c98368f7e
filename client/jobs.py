"""The submit flow and following a job to its end — shared by the CLI and the local server.

submit: validate the spec -> pack (or check) the archive -> estimate -> reserve against the
spend limit (atomically) -> upload -> create the training into its destination model (created
private when missing; a webhook when a public URL is configured) -> record it. On Replicate the
finished training is a new version of the destination, which ``advanced-trainer run`` renders. Each step's failure leaves the store consistent: a
reservation whose submission failed is released; a create whose answer was lost is found
again by its uploaded dataset URL instead of being submitted twice.

follow: webhooks and polling feed the same ``JobStore.apply_remote``, which accepts events in
any order and any number of times, so a job is never lost between the two paths.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from train.dataset_rules import IMAGE_EXTENSIONS, PairRule, check_pairs
from train.families import model_info
from train.inventory import scan_archive
from train.spec import SpecError, TrainingSpec, parse_spec

from . import pricing
from .calibration import Calibration
from .config import Settings, outputs_dir
from .delivery import JOB_ID, DeliveryError, deliver, output_url
from .errors import ProviderError, RemoteUserError, UserError, is_retryable
from .estimates import checked_hardware, hardware_estimate
from .pack import UPLOAD_LIMIT, PackError, pack_dataset
from .profiles import profile_for
from .providers import Provider, ReplicateProvider, plain_dict
from .records import TERMINAL, Job
from .spend import SpendLimit
from .store import JobStore, SpendLimitExceeded

EVENTS = ["start", "output", "logs", "completed"]


@dataclass
class Submission:
    record: Job
    estimate: pricing.Estimate
    warnings: list[str]


def load_spec(spec: str | Path | dict | None, overrides: dict[str, Any] | None = None) -> TrainingSpec:
    try:
        return parse_spec(spec, **(overrides or {}))
    except SpecError as exc:
        raise UserError(str(exc)) from None


def prepare_archive(
    dataset: Path, spec: TrainingSpec, workdir: Path, fit: bool = False, log: Callable[[str], None] = print
) -> tuple[Path, int]:
    """A zip under the upload limit: a folder is packed; an archive is checked. Returns (path, images)."""
    dataset = Path(dataset)
    if not dataset.exists():
        raise UserError(f"dataset {dataset} does not exist")
    if dataset.is_dir():
        try:
            # the spec's own limits: the packer refuses what this job's container would
            result = pack_dataset(
                dataset,
                workdir / "dataset.zip",
                limit_bytes=UPLOAD_LIMIT,
                fit=fit,
                min_side=max(spec.resolutions),
                max_files=spec.dataset.max_files,
                max_image_pixels=spec.dataset.max_image_pixels,
                model=spec.model,  # pairs for an edit model, none for the others: refused before uploading
                video=spec.video_rule(),  # a video model's clips: the trainer's frame counts and limits
            )
        except PackError as exc:
            raise UserError(str(exc)) from None
        log(result.summary())
        return result.archive, result.images
    size = dataset.stat().st_size
    if size > UPLOAD_LIMIT:
        raise UserError(
            f"{dataset.name} is {size / 2**20:.1f} MiB, over Replicate's upload limit of 100 MiB; "
            f"pack the folder with `advanced-trainer pack --fit`"
        )
    return dataset, archive_images(dataset, spec)


def archive_images(archive: Path, spec: TrainingSpec) -> int:
    """How many images a ready-made archive trains on, from its listing (nothing extracted); a
    UserError, before uploading, for an archive the container would refuse as a whole: not an
    archive, no image, or pairs the model cannot take."""
    try:
        inventory = scan_archive(archive, spec.dataset.max_files)
    except ValueError as exc:
        raise UserError(f"dataset {exc}") from None
    problem = check_pairs(PairRule.of(spec.model, model_info(spec.model)), inventory.pairing)
    if problem:
        raise UserError(f"dataset {archive.name}: {problem}")
    targets = inventory.targets()
    if not targets:
        raise UserError(
            f"dataset {archive.name}: the archive holds no image ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return len(targets)


_MODEL_REF = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")


def default_destination(owner: str, spec: TrainingSpec, dataset: Path) -> str:
    """``owner/<trigger word or dataset name>-<model>``, spelled as Replicate model names are
    (lowercase letters, digits, dashes, underscores, periods)."""
    stem = spec.trigger_word or Path(dataset).name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        stem = stem.removesuffix(suffix)
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:60].strip("-") or "lora"
    return f"{owner.lower()}/{slug}-{spec.model}"


def resolve_destination(
    provider: Provider, spec: TrainingSpec, dataset: Path, destination: str | None
) -> str | None:
    """The destination model of a Replicate training: the one given (checked), or one derived from
    the account and the dataset. A Cog server has no destinations (None)."""
    if provider.name != "replicate":
        return None
    if destination:
        if not _MODEL_REF.match(destination):
            raise UserError(
                f"destination: expected owner/name in lowercase letters, digits, dashes, underscores "
                f"or periods, got {destination!r}"
            )
        return destination
    return default_destination(provider.account()["username"], spec, dataset)


def _find_created(provider: Provider, kind: str, dataset_url: str) -> tuple[dict | None, bool]:
    """The job a create may have made without our hearing back, found by its dataset URL (each
    upload has its own URL) among the provider's most recent jobs (one page). Returns (the job
    or None, whether the provider could be asked)."""
    client = getattr(provider, "client", None)
    if client is None:
        return None, False
    try:
        page = (client.predictions if kind == "prediction" else client.trainings).list()
    except Exception:  # noqa: BLE001 - best effort: the caller decides what not knowing means
        return None, False
    for p in page.results:
        if (p.input or {}).get("dataset") == dataset_url:
            return plain_dict(p), True
    return None, True


STALE_AFTER_S = 600  # a reservation older than this whose process is gone is stale (a submit takes seconds)


def stale_hint(store: JobStore) -> str:
    stale = store.stale_reservations(STALE_AFTER_S)
    if not stale:
        return ""
    return (
        f"; {len(stale)} submission(s) interrupted before the provider's answer was recorded still count "
        f"(`advanced-trainer jobs --reconcile` finds their jobs or releases them)"
    )


def reconcile_stale(
    store: JobStore, provider_for: Callable[[Job], Provider], older_than_s: float = STALE_AFTER_S
) -> list[str]:
    """Settle reservations left "submitting" by a process that stopped between reserving and
    binding: a job the provider has for the recorded dataset upload is bound (it counts, and is
    followed like any other); a reservation that never sent anything, or whose job the provider
    does not have, is released; one whose provider cannot be asked is kept."""
    notes = []
    for rec in store.stale_reservations(older_than_s):
        key = rec["request_key"]
        inputs = rec["input_json"]
        dataset = json.loads(inputs).get("dataset") if inputs else None
        if not dataset:
            store.release(key, "abandoned: the submitting process stopped before the job was sent")
            notes.append(f"{key}: released (the job was never sent)")
            continue
        try:
            found, asked = _find_created(provider_for(rec), rec["kind"], dataset)
        except Exception as exc:  # noqa: BLE001 - e.g. no token or no cog_url here: say so, keep it
            notes.append(f"{key}: kept (could not ask {rec['provider']}: {exc})")
            continue
        if found is not None:
            try:
                bound = store.bind(key, found["id"], found)
            except (KeyError, ValueError) as exc:  # already bound or recorded by another process
                notes.append(f"{key}: kept ({exc})")
                continue
            notes.append(f"{key}: is job {bound['id']} ({bound['status']})")
        elif asked:
            store.release(key, "abandoned: the submitting process stopped and the provider has no job for it")
            notes.append(f"{key}: released (the provider has no job for it)")
        else:
            notes.append(f"{key}: kept (could not ask {rec['provider']} whether the job exists)")
    return notes


def publish_secrets(spec: TrainingSpec, env: dict[str, str] | None = None) -> dict[str, str]:
    """Credentials the container needs for the spec's Hub/S3 targets, from this environment
    (HF_TOKEN; AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). They go to the API as Secret inputs
    and nowhere else: the job store scrubs them from what it records."""
    env = dict(os.environ) if env is None else env
    out = {}
    if spec.publish.hub_model_id and env.get("HF_TOKEN"):
        out["hf_token"] = env["HF_TOKEN"]
    if spec.publish.s3_bucket and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        out["s3_access_key_id"] = env["AWS_ACCESS_KEY_ID"]
        out["s3_secret_access_key"] = env["AWS_SECRET_ACCESS_KEY"]
    return out


def check_publish_targets(
    spec: TrainingSpec, log: Callable[[str], None], env: dict[str, str] | None = None
) -> None:
    """The spec's publish targets checked from here, before anything is packed or uploaded (and a full
    fine-tune refused without one: it cannot come back through Cog's upload), with the
    credentials this environment holds (the container checks again before training, with those it
    is sent): a bad or read-only token, a namespace the token cannot write, an S3 key that may not
    write under the prefix. A UserError naming the input."""
    from train.publish import PublishError, check_hub, check_s3, full_fine_tune_target_problem

    problem = full_fine_tune_target_problem(spec)
    if problem:
        raise UserError(f"{problem} (nothing was uploaded)")
    secrets, target = publish_secrets(spec, env), spec.publish
    try:
        if target.hub_model_id and secrets.get("hf_token"):
            log(f"publish: {check_hub(target.hub_model_id, secrets['hf_token'])}")
        elif target.hub_model_id:
            log("publish: no HF_TOKEN here to check the Hub with; the trainer checks it before training")
        if target.s3_bucket and secrets.get("s3_access_key_id"):
            checked = check_s3(
                target.s3_bucket,
                target.s3_prefix,
                endpoint_url=target.s3_endpoint_url,
                region=target.s3_region,
                access_key_id=secrets["s3_access_key_id"],
                secret_access_key=secrets["s3_secret_access_key"],
            )
            log(f"publish: {checked}")
    except PublishError as exc:
        raise UserError(f"publish: {exc} (nothing was uploaded)") from None


def scale_steps_to_gpus(
    spec: TrainingSpec, hardware: str, log: Callable[[str], None] = print
) -> TrainingSpec:
    """The spec with its step-counted fields divided by the SKU's GPU count, so the job sees the
    same images in fewer steps (``--scale-steps-to-gpus``); said out loud, never done silently."""
    gpus = max(1, pricing.check_sku(hardware).gpus)
    if gpus == 1:
        log(f"--scale-steps-to-gpus: {hardware} has one GPU; steps stay {spec.steps}")
        return spec
    changes: dict[str, Any] = {"steps": pricing.scaled_steps(spec, gpus)}
    if spec.lr_warmup_steps:
        changes["lr_warmup_steps"] = spec.lr_warmup_steps // gpus
    if spec.checkpoint_interval:
        changes["checkpoint_interval"] = max(1, spec.checkpoint_interval // gpus)
    if spec.validation.interval:
        changes["validation.interval"] = max(1, spec.validation.interval // gpus)
    try:
        scaled = parse_spec(spec.to_json(), **changes)
    except SpecError as exc:
        raise UserError(f"--scale-steps-to-gpus: {exc}") from None
    images = spec.batch_size * spec.gradient_accumulation_steps
    log(
        f"--scale-steps-to-gpus: steps {spec.steps} -> {scaled.steps} on {gpus} GPUs "
        f"({images * gpus} images per step instead of {images}: the same images in all)"
    )
    return scaled


def target_profile(provider: Provider, settings: Settings, hardware: str, log: Callable[[str], None]) -> None:
    """Point a Replicate provider at the trainer model of ``hardware``'s profile (a model runs on
    one hardware setting). A trainer model named explicitly (``--model``) is kept as it is."""
    if not isinstance(provider, ReplicateProvider) or provider.model != settings.model:
        return
    profile = profile_for(settings, hardware)
    if profile.model != provider.model or profile.version != provider.pinned_version:
        provider.model, provider.pinned_version = profile.model, profile.version
    log(
        f"{hardware}: trainer model {profile.model}"
        + (f" (version {profile.version[:12]})" if profile.version else "")
    )


@dataclass(frozen=True)
class CarryOn:
    """A job that carries on another (client/resume.py): its uploaded dataset is reused (unless a
    dataset is given again), the store links the two, and the estimate counts only the new steps."""

    parent_id: str
    relation: str  # "resume" | "continue" (client.records.RELATIONS)
    dataset_url: str | None
    steps: int  # optimizer steps this job trains
    images: int = 20  # for the estimate when the dataset is not packed again


def submit(
    store: JobStore,
    provider: Provider,
    settings: Settings,
    spec: TrainingSpec,
    dataset: Path | None,
    *,
    hardware: str | None = None,
    destination: str | None = None,
    webhook: str | None = None,
    fit: bool = False,
    scale_steps: bool = False,
    extra_inputs: dict[str, Any] | None = None,
    carry_on: CarryOn | None = None,
    log: Callable[[str], None] = print,
) -> Submission:
    hardware = checked_hardware(hardware or settings.hardware, from_settings=not hardware)
    if scale_steps:
        spec = scale_steps_to_gpus(spec, hardware, log)
    target_profile(provider, settings, hardware, log)
    if destination and provider.name != "replicate":
        log(f"note: a Cog server has no destination models; {destination} is not used")
    destination = resolve_destination(provider, spec, dataset or Path("dataset"), destination)
    reuse = carry_on.dataset_url if carry_on and dataset is None else None
    check_publish_targets(spec, log)
    with tempfile.TemporaryDirectory(prefix="advanced-trainer-") as tmp:
        if reuse:
            archive, n_images = None, carry_on.images if carry_on else 20
        else:
            assert dataset is not None, "a new job needs its dataset"
            archive, n_images = prepare_archive(dataset, spec, Path(tmp), fit=fit, log=log)
        steps = carry_on.steps if carry_on else None
        est = hardware_estimate(spec, hardware, n_images, Calibration.from_store(store), steps)
        request_key = uuid.uuid4().hex
        record = {
            "provider": provider.name,
            "kind": "training",
            "model": getattr(provider, "model", None),
            "destination": destination,
            "hardware": hardware,
            "spec_json": spec.to_json(),
            "estimate_usd": round(est.usd, 4),
            "price_per_s": pricing.price_per_second(hardware),
            "webhook": bool(webhook),
            **({"parent_id": carry_on.parent_id, "relation": carry_on.relation} if carry_on else {}),
        }
        warnings = _reserve(store, request_key, record, settings, log)
        try:
            version = _trainer_version(provider, settings, hardware)
            if destination:  # before the upload: a destination we cannot create stops the job early
                # the destination renders (one image at a time): one GPU of the same card
                created = provider.ensure_destination(destination, pricing.single_gpu_sku(hardware))
                log(f"training into {destination}" + (" (created it, private)" if created else ""))
            dataset_url = reuse or provider.upload(cast(Path, archive))
            inputs = {
                "dataset": dataset_url,
                "spec": spec.to_json(),
                **publish_secrets(spec),
                **(extra_inputs or {}),
            }
            store.update(
                request_key, input_json=inputs
            )  # secrets scrubbed; lets a later reconcile find the job
            obj = _create(provider, version, inputs, dataset_url, webhook, destination, log)
        except BaseException as exc:
            store.release(request_key, str(exc))
            raise
        rec = store.bind(request_key, obj["id"], {**obj, "version": version})
    return Submission(rec, est, warnings)


def _trainer_version(provider: Provider, settings: Settings, hardware: str) -> str:
    """The trainer version to train with; a missing profile model says how to make it."""
    try:
        return provider.resolve_version()
    except RemoteUserError as exc:
        model = getattr(provider, "model", None)
        if exc.status != 404 or model is None or model == settings.model:
            raise
        raise RemoteUserError(
            f"{exc}; {model} is the trainer model of the {hardware} profile: create it and push the "
            f"image with `python scripts/push_profiles.py --only {hardware}`, or name another model "
            f'with `advanced-trainer config set profiles \'{{"{hardware}": "owner/name"}}\'`',
            exc.status,
        ) from None


def _reserve(
    store: JobStore, request_key: str, record: dict[str, Any], settings: Settings, log: Callable[[str], None]
) -> list[str]:
    """The row and its spend check in one transaction; returns the warnings to show."""
    limit = SpendLimit.from_dict(settings.spend_limit) if settings.spend_limit else None
    try:
        _, decision = store.reserve(
            request_key,
            record,
            limit_usd=limit.amount_usd if limit else None,
            period_start=limit.period_start() if limit else None,
            action=limit.action if limit else "warn",
        )
    except SpendLimitExceeded as exc:
        raise UserError(str(exc) + stale_hint(store)) from None
    if decision.status != "warn":
        return []
    log(f"warning: {decision.message}")
    return [str(decision.message)]


def _create(
    provider: Provider,
    version: str,
    inputs: dict[str, Any],
    dataset_url: str,
    webhook: str | None,
    destination: str | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Create the training; when the answer is lost, find the job it made by its dataset URL."""
    try:
        return provider.create("training", version, inputs, webhook, EVENTS, destination)
    except ProviderError as exc:
        if isinstance(exc, RemoteUserError):
            raise
        lost, _ = _find_created(provider, "training", dataset_url)
        if lost is None:
            raise
        log(f"the create request's answer was lost, but the job exists: {lost['id']}")
        return lost


def refresh(store: JobStore, provider: Provider, job_id: str) -> Job:
    rec = store.get(job_id)
    if rec is None:
        raise UserError(f"no job {job_id} in the job store")
    merged, _ = store.apply_remote(job_id, provider.get(rec["kind"], job_id), "poll")
    assert merged is not None, "a job in the store merges into its record"
    return merged


def follow(
    store: JobStore,
    provider: Provider,
    job_id: str,
    on_update: Callable[[Job], None] | None = None,
    poll_min: float = 0.5,
    poll_max: float = 15.0,
    timeout: float | None = None,
    webhook_quiet_s: float = 60.0,
) -> Job:
    """Wait for a job to end. Polls with backoff; when webhooks are flowing into the store
    (``serve``), polling only resumes after ``webhook_quiet_s`` seconds without one."""
    delay = poll_min
    start = time.monotonic()
    last_seen: tuple | None = None
    while True:
        rec = store.get(job_id)
        if rec is None:
            raise UserError(f"no job {job_id} in the job store")
        last_event = rec["last_event_at"]
        webhooks_flowing = (
            rec["webhook"] and last_event and time.time() - epoch_seconds(last_event) < webhook_quiet_s
        )
        if rec["status"] not in TERMINAL and not webhooks_flowing:
            try:
                rec = refresh(store, provider, job_id)
            except ProviderError as exc:
                if not is_retryable(exc.status):
                    raise
                delay = min(poll_max, max(delay * 2, exc.retry_after or 0))
        seen = (rec["status"], rec.get("step"), len(rec.get("logs_tail") or ""))
        if seen != last_seen:
            last_seen = seen
            delay = poll_min
            if on_update:
                on_update(rec)
        else:
            delay = min(poll_max, delay * 1.5)
        if rec["status"] in TERMINAL:
            return rec
        if timeout is not None and time.monotonic() - start > timeout:
            return rec
        time.sleep(delay)


def epoch_seconds(value: str | float) -> float:
    """A store timestamp (ISO 8601, ``Z`` allowed, or already epoch seconds) as epoch seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def deliver_job(store: JobStore, rec: Job, root: Path | None = None, progress=None) -> dict:
    """Download a succeeded job's archive to cloud_outputs/<id>/ (resuming), verify and unpack it."""
    if rec["status"] != "succeeded":
        raise UserError(f"job {rec['id']} is {rec['status']}; only succeeded jobs have outputs")
    output_json = rec["output_json"]
    output = json.loads(output_json) if output_json else None
    url = output_url(rec["kind"], output)
    if not url:
        raise UserError(f"job {rec['id']} has no output archive")
    folder = outputs_dir(root) / rec["id"]
    try:
        info = deliver(url, folder, progress)
    except DeliveryError as exc:  # the job itself succeeded: say so, and how to fetch it again
        message = f"job {rec['id']} succeeded; its outputs were not delivered: {exc}".replace(
            JOB_ID, rec["id"]
        )
        raise DeliveryError(message, exc.status) from None
    store.update(rec["id"], local_dir=str(folder), delivered=True)
    return info
