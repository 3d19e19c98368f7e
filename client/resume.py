"""Carrying a job on: ``resume`` a failed or canceled training from its last checkpoint, or
``continue`` a succeeded one for more steps. Shared by the CLI and the local server.

Both submit a new training with the parent's spec, dataset (the uploaded archive is reused unless
a dataset is given again) and destination, linked to the parent in the store (``parent_id``,
``relation``); each job is billed and counted in the ledger on its own.

- resume: Cog delivers no output for a failed or canceled job, so its last checkpoint can only
  come from the spec's publish target, where the train entry delivers it with
  ``return_checkpoint`` (``<s3_prefix>/checkpoints/step-N/`` in the bucket, or the Hub repo). The
  new training fetches it there itself (``resume_checkpoint``: the newest checkpoint under
  ``<s3_prefix>/checkpoints/``, so give each job its own prefix), with the same credentials the
  parent published with; nothing passes through this machine.
- continue: a job trained with ``resumable: true`` keeps a checkpoint of its final step in its
  output (``resume/``); the new training gets the parent's output archive as ``resume_from`` and
  ``steps`` grows by N. With a constant learning rate (the default) it ends exactly where one
  longer run would; a decaying schedule follows the new total from the step it resumes at.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.spec import SpecError, TrainingSpec, parse_spec

from .config import Settings
from .delivery import output_url
from .errors import UserError
from .jobs import CarryOn, Submission, submit
from .providers import Provider
from .records import Job
from .store import JobStore

_SAVED = re.compile(r"checkpoint: step (\d+) saved to ")
_RESUMED = re.compile(r"resume: from step (\d+)")


def _spec(rec: Job) -> TrainingSpec:
    try:
        return parse_spec(rec["spec_json"] or "{}")
    except SpecError as exc:
        raise UserError(f"job {rec['id']}: its recorded spec no longer validates: {exc}") from None


def _inputs(rec: Job) -> dict[str, Any]:
    try:
        inputs = json.loads(rec["input_json"] or "{}")
    except ValueError:
        inputs = {}
    return inputs if isinstance(inputs, dict) else {}


def last_checkpoint_step(rec: Job) -> int | None:
    """The last step the job's logs say it checkpointed (or resumed from), if any."""
    text = rec["logs_tail"] or ""
    steps = [int(m.group(1)) for m in _SAVED.finditer(text)] + [
        int(m.group(1)) for m in _RESUMED.finditer(text)
    ]
    return max(steps) if steps else None


def checkpoint_location(rec: Job, spec: TrainingSpec) -> str:
    """Where a failed or canceled job's last checkpoint was delivered (s3:// or hf://)."""
    pub = spec.publish
    if not _inputs(rec).get("return_checkpoint"):
        raise UserError(
            f"job {rec['id']} was not asked to keep its checkpoint (return_checkpoint), so a failed or "
            "canceled run has none to resume from; submit it again"
        )
    if not (pub.s3_bucket or pub.hub_model_id):
        raise UserError(
            f"job {rec['id']} has no publish target: Cog delivers no output for a failed or canceled job, "
            "so its checkpoint goes only to publish.s3_bucket or publish.hub_model_id; submit it again with one"
        )
    if "no checkpoint was written before the job stopped" in (rec["logs_tail"] or ""):
        raise UserError(
            f"job {rec['id']} stopped before its first checkpoint (checkpoint_interval); nothing to resume"
        )
    if pub.s3_bucket:
        # the newest checkpoint under the prefix: the one delivered when the job stopped (the logs
        # seen here may end before its last checkpoint)
        return f"s3://{pub.s3_bucket}/" + "/".join(p for p in (pub.s3_prefix.strip("/"), "checkpoints") if p)
    return f"hf://{pub.hub_model_id}"


def _dataset_url(rec: Job, dataset: Path | None, log: Callable[[str], None]) -> str | None:
    url = _inputs(rec).get("dataset")
    if dataset is not None:
        return None
    if not isinstance(url, str) or not url:
        raise UserError(f"job {rec['id']} has no recorded dataset upload; pass --dataset to upload it again")
    log(
        f"reusing job {rec['id']}'s uploaded dataset (uploads expire a day after; --dataset uploads it again)"
    )
    return url


def resume_job(
    store: JobStore,
    provider: Provider,
    settings: Settings,
    rec: Job,
    *,
    dataset: Path | None = None,
    webhook: str | None = None,
    log: Callable[[str], None] = print,
) -> Submission:
    """A training that carries a failed or canceled job on from its last delivered checkpoint."""
    if rec["status"] == "succeeded":
        raise UserError(
            f"job {rec['id']} succeeded: `advanced-trainer continue {rec['id']} --steps N` trains it further"
        )
    if rec["status"] not in ("failed", "canceled"):
        raise UserError(f"job {rec['id']} is {rec['status']}: only a failed or canceled job can be resumed")
    spec = _spec(rec)
    where = checkpoint_location(rec, spec)
    step = last_checkpoint_step(rec) or 0
    log(f"resuming job {rec['id']} from its checkpoint {where}")
    carry = CarryOn(rec["id"], "resume", _dataset_url(rec, dataset, log), max(1, spec.steps - step))
    return submit(
        store,
        provider,
        settings,
        spec,
        dataset,
        hardware=rec["hardware"],
        destination=rec["destination"],
        webhook=webhook,
        extra_inputs={"resume_checkpoint": where, "return_checkpoint": True},
        carry_on=carry,
        log=log,
    )


def continue_job(
    store: JobStore,
    provider: Provider,
    settings: Settings,
    rec: Job,
    steps: int,
    *,
    dataset: Path | None = None,
    webhook: str | None = None,
    log: Callable[[str], None] = print,
) -> Submission:
    """A training that trains a succeeded, resumable job ``steps`` steps further."""
    if rec["status"] != "succeeded":
        hint = (
            f"; `advanced-trainer resume {rec['id']}` carries it on"
            if rec["status"] in ("failed", "canceled")
            else ""
        )
        raise UserError(f"job {rec['id']} is {rec['status']}: only a succeeded job can be continued{hint}")
    if steps < 1:
        raise UserError(f"--steps: must be at least 1, got {steps}")
    spec = _spec(rec)
    if not spec.resumable:
        raise UserError(
            f"job {rec['id']} kept no final checkpoint (its spec has resumable: false); "
            "set resumable: true on a job to continue it later"
        )
    output = json.loads(rec["output_json"]) if rec["output_json"] else None
    weights = output_url(rec["kind"], output)
    if not weights:
        raise UserError(f"job {rec['id']} has no output archive to continue from")
    try:
        longer = parse_spec(spec.to_json(), steps=spec.steps + steps)
    except SpecError as exc:
        raise UserError(f"--steps: {exc}") from None
    log(f"continuing job {rec['id']}: steps {spec.steps} -> {longer.steps}")
    return submit(
        store,
        provider,
        settings,
        longer,
        dataset,
        hardware=rec["hardware"],
        destination=rec["destination"],
        webhook=webhook,
        extra_inputs={"resume_from": weights},
        carry_on=CarryOn(rec["id"], "continue", _dataset_url(rec, dataset, log), steps),
        log=log,
    )
