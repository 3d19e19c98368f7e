"""advanced-trainer: submit training jobs to Replicate (or any Cog server) and track them.

--json (before or after the command) gives machine-readable output.

Exit codes: 0 done; 1 the job failed or was canceled; 2 a problem you can fix (bad spec,
dataset too large, token missing or refused, no billing, unknown model, spend limit); 3 a
remote failure (the network or the API broke, or throttled: try again).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from train.progress import publish_failure
from train.spec import parse_set_items

from . import pricing
from . import token as tokens
from .calibration import Calibration
from .cog_receiver import CogHookReceiver
from .config import Settings, outputs_dir, store_path
from .delivery import pick_step, publish_delivered
from .errors import EXIT_JOB_FAILED, EXIT_OK, EXIT_REMOTE, EXIT_USER, ClientError, UserError, exit_code
from .estimates import DEFAULT_SKUS, cheapest, estimate_row, parse_duration
from .jobs import deliver_job, follow, load_spec, reconcile_stale, refresh, submit
from .pack import PackError, pack_dataset
from .profiles import hardware_rows
from .providers import CogProvider, Provider, ReplicateProvider
from .records import TERMINAL, Job
from .resume import continue_job, resume_job
from .run import resolve_target, run
from .settings_api import apply_settings
from .spend import spend_summary
from .statuspage import replicate_status
from .store import JobStore

__all__ = ["EXIT_OK", "EXIT_JOB_FAILED", "EXIT_USER", "EXIT_REMOTE", "build_parser", "main"]


def _out(args, data: Any, human: str | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    elif human is not None:
        print(human)


def _store() -> JobStore:
    return JobStore(store_path())


def make_provider(args, settings: Settings) -> Provider:
    if getattr(args, "provider", "replicate") == "cog":
        url = getattr(args, "cog_url", None) or settings.cog_url
        if not url:
            raise UserError("provider cog needs --cog-url (or `advanced-trainer config set cog_url URL`)")
        return CogProvider(url)
    tok = tokens.resolve()
    return ReplicateProvider(
        tok.value,
        model=getattr(args, "model", None) or settings.model,
        version=settings.version,
        base_url=os.environ.get("REPLICATE_BASE_URL") or None,
    )


def _items(items: list[str], flag: str = "--set") -> dict[str, Any]:
    try:
        return parse_set_items(items, flag)
    except ValueError as exc:
        raise UserError(str(exc)) from None


# -- commands ------------------------------------------------------------------------------------


def cmd_validate(args, settings):
    provider = make_provider(args, settings)
    account = provider.account()
    source = tokens.status().get("source") if provider.name == "replicate" else None
    status = replicate_status() if provider.name == "replicate" else None
    human = (
        f"token OK ({source}): {account.get('username')} ({account.get('type')}, {account.get('name')})"
        if source
        else f"reachable: {account.get('name')}"
    )
    if status:
        human += f"\nReplicate status: {status['indicator']} ({status['description']})"
    _out(args, {"ok": True, "account": account, "token_source": source, "replicate_status": status}, human)


def cmd_versions(args, settings):
    provider = make_provider(args, settings)
    versions = provider.versions()
    pinned = settings.version
    _out(
        args,
        {"model": getattr(provider, "model", None), "pinned": pinned, "versions": versions},
        "\n".join(
            f"{'*' if v['id'] == pinned else ' '} {v['id']}  {v.get('created_at') or ''}" for v in versions
        )
        or "no versions",
    )


def cmd_hardware(args, settings):
    listed = []
    if not args.offline:
        try:
            listed = make_provider(args, settings).hardware()
        except Exception as exc:  # noqa: BLE001 - prices are still useful without the API
            print(
                f"note: could not list hardware from the API ({exc}); showing the price table",
                file=sys.stderr,
            )
    rows = hardware_rows(settings, listed)
    _out(
        args,
        rows,
        "\n".join(
            f"{r['sku']:<20} {r['name']:<28} "
            + (f"${r['usd_per_hour']:>6.2f}/h" if r["usd_per_hour"] is not None else "  no list price")
            + (f"  trains with {r['trainer_model']}" if r["trainer_model"] else "")
            for r in rows
        ),
    )


def cmd_billing(args, settings):
    spend = spend_summary(_store())
    data = {
        "balance": None,
        "balance_note": "unavailable: Replicate has no public balance endpoint",
        "local_spend_usd": spend,
        "spend_limit": settings.spend_limit,
        "prices_usd_per_hour": {k: v[1] for k, v in pricing.HARDWARE.items()},
    }
    limit = settings.spend_limit
    _out(
        args,
        data,
        "\n".join(
            [
                "balance: unavailable (Replicate has no public balance endpoint)",
                f"spent (local ledger): today ${spend['daily']:.2f}, this week ${spend['weekly']:.2f}, "
                f"this month ${spend['monthly']:.2f}",
                f"spend limit: ${limit['amount_usd']:.2f} per {limit['period']} ({limit['action']})"
                if limit
                else "spend limit: none",
            ]
        ),
    )


def cmd_estimate(args, settings):
    spec = load_spec(args.spec, _items(args.set))
    n = args.images or 20
    calibration = Calibration.from_store(_store())
    if args.cheapest or args.deadline:
        deadline = parse_duration("--deadline", args.deadline) if args.deadline else None
        rows = cheapest(spec, n, calibration, settings, deadline, args.scale_steps_to_gpus)
        _out(args, rows, _ranking(rows, deadline, args.scale_steps_to_gpus))
        return
    skus = [args.hardware] if args.hardware else list(DEFAULT_SKUS)
    rows = [estimate_row(spec, sku, n, calibration, settings, args.scale_steps_to_gpus) for sku in skus]
    _out(args, rows, "\n".join(_estimate_lines(r) for r in rows))


def _estimate_lines(row: dict) -> str:
    lines = [f"{row['hardware']:<18} {row['description']}", f"{'':<18} trains with {row['trainer_model']}"]
    alt = row["same_images_fewer_steps"]
    if alt:
        lines.append(
            f"{'':<18} same images in fewer steps ({alt['flag']}): {alt['steps']} steps, "
            f"~{alt['seconds'] / 60:.0f} min ≈ ${alt['usd']:.2f}"
        )
    sizes = f"output ~{row['weights_mb'] + row['kept_steps_mb']:.0f} MiB"
    if row.get("published_model_mb") is not None:
        sizes = (
            f"the fine-tuned denoiser (~{row['published_model_mb'] / 1024:.1f} GiB) goes to the publish "
            f"target; output.zip holds samples and a pointer to it"
        )
    if row.get("resumable_checkpoint_mb") is not None:
        sizes += f" + a resumable checkpoint of ~{row['resumable_checkpoint_mb']:.0f} MiB"
    lines.append(f"{'':<18} {sizes}")
    lines += [f"{'':<18} note: {n}" for n in row["notes"]]
    return "\n".join(lines)


def _ranking(rows: list[dict], deadline: float | None, scaled: bool) -> str:
    lines = [
        f"{i:>2}. {r['hardware']:<18} ~{r['seconds'] / 60:>5.0f} min  ${r['usd']:>7.2f}  {r['steps']} steps"
        f"  ({r['source']}, ±{r['expected_error']:.0%})"
        + ("" if r["within_deadline"] else "  over the deadline")
        for i, r in enumerate(rows, 1)
    ]
    if deadline is not None and not rows[0]["within_deadline"]:
        lines.append(f"nothing finishes within {deadline / 60:.0f} min")
        if not scaled:
            lines.append("the same images in fewer steps on more GPUs may: add --scale-steps-to-gpus")
    return "\n".join(lines)


def cmd_pack(args, settings):
    spec = load_spec(args.spec, _items(args.set))
    folder = Path(args.folder).resolve()
    out = (
        Path(args.out) if args.out else folder.parent / f"{folder.name}.zip"
    )  # beside the folder, never inside
    try:
        result = pack_dataset(
            folder,
            out,
            fit=args.fit,
            min_side=max(spec.resolutions),
            max_files=spec.dataset.max_files,
            max_image_pixels=spec.dataset.max_image_pixels,
            progress=_bar("pack") if not args.json else None,
            model=spec.model,  # pairs for an edit model, single images for the others (docs/edit.md)
            video=spec.video_rule(),  # a video model's clips: the trainer's frame counts and limits
        )
    except PackError as exc:
        raise UserError(str(exc)) from None
    _out(args, result.to_dict(), result.summary())


def _bar(label: str):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # only for a terminal: tqdm is slow to import and optional

    state: dict[str, Any] = {}

    def update(done: int, total: int | None) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=label, unit="B", unit_scale=True, file=sys.stderr)
        bar.update(done - bar.n)

    return update


def _print_update(rec: Job) -> None:
    parts = [f"{rec['id']}: {rec['status']}"]
    phase = rec.get("phase")
    if phase == "train" and rec.get("total"):
        parts.append(f"step {rec['step']}/{rec['total']}")
    elif phase in ("caption", "cache", "validate") and rec.get("total"):
        parts.append(f"{phase} {rec['step']}/{rec['total']}")
    elif phase and rec["status"] == "processing":
        parts.append(phase)
    if rec.get("loss") is not None:
        parts.append(f"loss {rec['loss']:.4f}")
    eta = rec["eta_s"]
    if eta is not None and rec["status"] == "processing":
        parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
    print("  ".join(parts), file=sys.stderr, flush=True)


def cmd_submit(args, settings):
    spec = load_spec(args.spec, _items(args.set))
    provider = make_provider(args, settings)
    store = _store()
    receiver = None
    webhook = None
    if provider.name == "replicate":
        webhook = settings.webhook_url()
    elif args.wait and isinstance(provider, CogProvider):
        receiver = CogHookReceiver(store, provider)
        webhook = receiver.url
    try:
        sub = submit(
            store,
            provider,
            settings,
            spec,
            Path(args.dataset),
            hardware=args.hardware,
            destination=args.destination,
            webhook=webhook,
            fit=args.fit,
            scale_steps=args.scale_steps_to_gpus,
            extra_inputs={"return_checkpoint": True} if args.keep_checkpoint else None,
            log=(lambda m: print(m, file=sys.stderr)),
        )
        rec = sub.record
        if not args.json:
            into = f" into {rec['destination']}" if rec.get("destination") else ""
            print(
                f"submitted {rec['kind']} {rec['id']}{into} — estimate {sub.estimate.describe()}",
                file=sys.stderr,
            )
            if not webhook:
                print("no public URL set: following the job by polling", file=sys.stderr)
        if not args.wait:
            _out(args, {"job": rec, "estimate_usd": round(sub.estimate.usd, 2)}, rec["id"])
            return EXIT_OK
        return _wait_and_deliver(args, store, provider, rec["id"])
    finally:
        if receiver:
            receiver.close()


def _wait_and_deliver(args, store: JobStore, provider: Provider, job_id: str) -> int:
    rec = follow(store, provider, job_id, on_update=None if args.json else _print_update)
    result: dict[str, Any] = {"job": rec}
    human = f"job {rec['id']} {rec['status']}: {rec.get('error') or ''}"
    if rec["status"] == "succeeded":
        result["outputs"] = deliver_job(store, rec, progress=_bar("download"))
        human = _describe_outputs(result["outputs"]) + _try_hint(rec)
    _out(args, result, human)
    return EXIT_OK if rec["status"] == "succeeded" else EXIT_JOB_FAILED


def _try_hint(rec: Job) -> str:
    output_json = rec["output_json"]
    output = json.loads(output_json) if output_json else {}
    version = output.get("version") if isinstance(output, dict) else None
    if rec["provider"] == "replicate" and version:
        return (
            f"\nnew version:        {version}\ntry it:             advanced-trainer run {rec['id']} "
            f'--prompt "a photo of {_trigger(rec) or "TOK"}"'
        )
    return (
        f"\ntry it:             advanced-trainer run {rec['id']} --provider cog --cog-url <run-mode server> "
        f'--prompt "a photo of {_trigger(rec) or "TOK"}"'
    )


def _trigger(rec: Job) -> str:
    try:
        return json.loads(rec.get("spec_json") or "{}").get("trigger_word") or ""
    except ValueError:
        return ""


def _image_inputs(files: list[str] | None) -> dict[str, Any]:
    """``--image`` files as the run entry's ``input_image`` (the first) and ``input_images``."""
    paths = [Path(f).expanduser() for f in files or []]
    for p in paths:
        if not p.is_file():
            raise UserError(f"--image: {p} is not a file")
    if not paths:
        return {}
    return {"input_image": paths[0], "input_images": paths[1:] or None}


def cmd_run(args, settings):
    target = resolve_target(_store(), args.target)
    if target.provider == "cog" or args.provider == "cog":
        args.provider = "cog"
        args.cog_url = args.cog_url or settings.cog_run_url
        if not args.cog_url:
            raise UserError(
                "running on a Cog server needs --cog-url (a server in run mode) or "
                "`advanced-trainer config set cog_run_url URL`"
            )
        if target.provider != "cog":
            raise UserError(
                f"{args.target} is a Replicate model; a Cog server runs a job's weights (pass a job id)"
            )
    provider = make_provider(args, settings)
    inputs = {
        "prompt": args.prompt,
        "num_outputs": args.num_outputs,
        "seed": args.seed,
        "aspect_ratio": args.aspect_ratio,
        "lora_scale": args.lora_scale,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "output_format": args.output_format,
        "step": args.lora_step,
        **_image_inputs(args.image),
        **_items(args.input, "--input"),
    }
    if not args.json:
        where = target.ref if target.provider == "replicate" else f"{target.ref} on {args.cog_url}"
        print(f"running {where} ...", file=sys.stderr)

    def folder_for(pred_id: str) -> Path:
        if args.out:
            return Path(args.out)
        if target.job is not None:
            return outputs_dir() / target.job["id"] / "tries" / pred_id
        return outputs_dir() / "runs" / pred_id

    result = run(provider, target, inputs, folder_for)
    took = (result.prediction.get("metrics") or {}).get("predict_time")
    _out(
        args,
        result.to_dict(),
        f"{len(result.images)} {'video' if all(p.suffix in ('.mp4', '.webm') for p in result.images) else 'image'}(s) "
        f"from {result.prediction.get('id')}"
        + (f" in {took:.1f}s" if took else "")
        + ":\n"
        + "\n".join(f"  {p}" for p in result.images),
    )


def _describe_outputs(o: dict | None) -> str:
    if not o:
        return ""
    lines = [f"outputs in {o['folder']}"]
    if o.get("lora"):
        lines.append(f"LoRA (diffusers):   {o['lora']}")
    if o.get("kohya"):
        lines.append(f"LoRA (kohya):       {o['kohya']}")
    if o.get("model"):
        lines.append(f"model (diffusers):  {o['model']}")
    if o.get("samples"):
        lines.append(f"validation images:  {', '.join(o['samples'])}")
    if o.get("loss_plot"):
        lines.append(f"loss plot:          {o['loss_plot']}")
    if o.get("contact_sheet"):
        lines.append(f"contact sheet:      {o['contact_sheet']}")
    if o.get("chosen_step") is not None:
        lines.append(f"chosen step:        {o['chosen_step']} ({o.get('selection_reason') or ''})")
    if o.get("picked_step") is not None:
        lines.append(f"picked step:        {o['picked_step']} (the LoRA above is that step's)")
    kept = o.get("kept_steps") or {}
    if len(kept) > 1:
        lines.append(
            f"kept steps:         {', '.join(kept)} (files under steps/step-N/; "
            "`download --step N` or `run --step N` for another)"
        )
    return "\n".join(lines)


def _job(store: JobStore, job_id: str) -> Job:
    rec = store.get(job_id)
    if rec is None:
        raise UserError(f"no job {job_id} in the job store ({store_path()})")
    return rec


def _provider_for(rec: Job, args, settings: Settings) -> Provider:
    args.provider = rec["provider"]
    return make_provider(args, settings)


def cmd_status(args, settings):
    store = _store()
    rec = _job(store, args.id)
    if rec["status"] not in TERMINAL and not args.offline:
        rec = refresh(store, _provider_for(rec, args, settings), args.id)
    failed = publish_failure(rec.get("logs_tail"))
    shown = {**rec, "publish_failed": failed}
    publish_line = (
        f"\npublish failed: {failed} (the weights are in the outputs: `advanced-trainer publish {rec['id']}`)"
    )
    _out(
        args,
        shown,
        "\n".join(
            f"{k}: {rec[k]}"
            for k in (
                "id",
                "kind",
                "status",
                "step",
                "total",
                "loss",
                "eta_s",
                "estimate_usd",
                "cost_usd",
                "error",
                "local_dir",
            )
            if rec.get(k) is not None
        )
        + (publish_line if failed else ""),
    )


def cmd_logs(args, settings):
    store = _store()
    rec = _job(store, args.id)
    provider = _provider_for(rec, args, settings)
    shown = 0
    while True:
        obj = provider.get(rec["kind"], args.id)
        store.apply_remote(args.id, obj, "poll")
        logs = obj.get("logs") or ""
        sys.stdout.write(logs[shown:])
        sys.stdout.flush()
        shown = len(logs)
        if not args.follow or obj.get("status") in TERMINAL:
            return EXIT_OK
        time.sleep(2)
        rec = refresh(store, provider, args.id)


def cmd_cancel(args, settings):
    store = _store()
    rec = _job(store, args.id)
    obj = _provider_for(rec, args, settings).cancel(rec["kind"], args.id)
    merged, _ = store.apply_remote(args.id, obj, "poll")
    assert merged is not None, "a job in the store merges into its record"
    _out(args, merged, f"{args.id}: {merged['status']}")


def cmd_download(args, settings):
    store = _store()
    rec = _job(store, args.id)
    if rec["status"] not in TERMINAL:
        rec = refresh(store, _provider_for(rec, args, settings), args.id)
    info = deliver_job(store, rec, progress=_bar("download"))
    if args.step is not None:
        info = pick_step(info, args.step)
    _out(args, info, _describe_outputs(info))


def cmd_publish(args, settings):
    """Publish a succeeded job's outputs from this machine (after a publish that failed in the job,
    or to another target); downloads them first when they are not here yet."""
    from pydantic import ValidationError

    from train.spec import PublishSpec

    if not (args.hub or args.s3):
        raise UserError("publish: give --hub owner/name, --s3 s3://bucket/prefix, or both")
    bucket, _, prefix = (args.s3 or "").removeprefix("s3://").partition("/")
    if args.s3 and not args.s3.startswith("s3://"):
        raise UserError(f"--s3: expected s3://bucket/prefix, got {args.s3!r}")
    try:
        target = PublishSpec(
            hub_model_id=args.hub,
            hub_private=not args.public,
            s3_bucket=bucket or None,
            s3_prefix=prefix,
            s3_endpoint_url=args.s3_endpoint_url,
            s3_region=args.s3_region,
            s3_public_base_url=args.s3_public_base_url,
        )
    except ValidationError as exc:
        fields = ", ".join(str(e["loc"][0]) for e in exc.errors())
        raise UserError(f"publish: not a valid target ({fields}): {exc.errors()[0]['msg']}") from None
    store = _store()
    rec = _job(store, args.id)
    if rec["status"] not in TERMINAL:
        rec = refresh(store, _provider_for(rec, args, settings), args.id)
    local = rec.get("local_dir")
    folder = Path(local) if local else None
    if not (rec.get("delivered") and folder and (folder / "output.zip").is_file()):
        folder = Path(deliver_job(store, rec, progress=_bar("download"))["folder"])
    results = publish_delivered(folder, target, os.environ, log=lambda m: print(m, file=sys.stderr))
    lines = [f"published {rec['id']}:"] + [
        f"  {k}: {v if isinstance(v, str) else f'{len(v)} files'}" for k, v in results.items()
    ]
    _out(args, {"job": rec["id"], "published": results}, "\n".join(lines))


def _carry_on(args, settings, start) -> int:
    """Submit the job that resumes or continues ``args.id``, then report or follow it like submit."""
    store = _store()
    parent = _job(store, args.id)
    provider = _provider_for(parent, args, settings)
    receiver = None
    webhook = settings.webhook_url() if provider.name == "replicate" else None
    if args.wait and isinstance(provider, CogProvider):
        receiver = CogHookReceiver(store, provider)
        webhook = receiver.url
    try:
        dataset = Path(args.dataset) if args.dataset else None
        sub = start(store, provider, settings, parent, dataset, webhook, lambda m: print(m, file=sys.stderr))
        rec = sub.record
        if not args.json:
            print(
                f"submitted {rec['relation']} of {parent['id']}: {rec['id']} — estimate {sub.estimate.describe()}",
                file=sys.stderr,
            )
        if not args.wait:
            _out(args, {"job": rec, "estimate_usd": round(sub.estimate.usd, 2)}, rec["id"])
            return EXIT_OK
        return _wait_and_deliver(args, store, provider, rec["id"])
    finally:
        if receiver:
            receiver.close()


def cmd_resume(args, settings):
    return _carry_on(
        args,
        settings,
        lambda store, provider, settings, parent, dataset, webhook, log: resume_job(
            store, provider, settings, parent, dataset=dataset, webhook=webhook, log=log
        ),
    )


def cmd_continue(args, settings):
    return _carry_on(
        args,
        settings,
        lambda store, provider, settings, parent, dataset, webhook, log: continue_job(
            store, provider, settings, parent, args.steps, dataset=dataset, webhook=webhook, log=log
        ),
    )


def cmd_jobs(args, settings):
    store = _store()
    if args.reconcile:
        notes = reconcile_stale(store, lambda rec: _provider_for(rec, args, settings), args.older_than * 60)
        print("\n".join(notes) or "no interrupted submissions", file=sys.stderr)
    rows = store.list(limit=args.limit)
    _out(
        args,
        rows,
        "\n".join(
            f"{r['id']:<28} {r['kind']:<10} {r['status']:<10} "
            f"{(str(r.get('step')) + '/' + str(r.get('total'))) if r.get('total') else '':<12} "
            f"${(r.get('cost_usd') if r.get('cost_usd') is not None else r.get('estimate_usd') or 0):.2f}"
            + ("  publish failed" if publish_failure(r.get("logs_tail")) else "")
            for r in rows
        )
        or "no jobs yet",
    )


def cmd_token(args, settings):
    if args.action == "delete":
        had = tokens.delete()
        _out(args, {"deleted": had}, "token deleted from the secrets file" if had else "no saved token")
        return
    value = sys.stdin.readline() if args.stdin else getpass.getpass("Replicate API token (input hidden): ")
    value = value.rstrip("\r\n") if args.stdin else value
    path = tokens.save(value)
    _out(args, {"saved": str(path)}, f"token saved to {path} (mode 0600)")


def cmd_config(args, settings):
    if args.action == "show" or args.action is None:
        _out(args, asdict(settings), json.dumps(asdict(settings), indent=2))
        return
    if args.key is None or args.value is None:
        raise UserError(
            "config set needs a KEY and a VALUE, e.g. `advanced-trainer config set public_url https://...`"
        )
    try:
        updated = apply_settings(settings, {args.key: _parse_value(args.value)})
    except ValueError as exc:
        raise UserError(str(exc)) from None
    updated.save()
    _out(args, {"ok": True}, f"{args.key} saved")


def _parse_value(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def cmd_serve(args, settings):
    from .server import serve  # fastapi and uvicorn load only for `serve`

    serve(args.host, args.port)


# -- parser ----------------------------------------------------------------------------------------
# Global flags are accepted before the command and after it (`advanced-trainer validate --json`, as
# with gh, kubectl or docker). After it they default to SUPPRESS, so a command's parser never
# overwrites a flag given before the command with its default.


def _global_flags(p: argparse.ArgumentParser, after_command: bool) -> None:
    default: Any = argparse.SUPPRESS if after_command else False
    p.add_argument("--json", action="store_true", default=default, help="machine-readable output")


def _command(sub, name: str, fn, help: str) -> argparse.ArgumentParser:
    sp = sub.add_parser(name, help=help)
    _global_flags(sp, after_command=True)
    sp.set_defaults(fn=fn)
    return sp


def _provider_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--provider", choices=["replicate", "cog"], default="replicate")
    sp.add_argument("--cog-url", help="the Cog HTTP server (provider cog)")
    sp.add_argument(
        "--model", help="owner/model on Replicate (default: settings, simpletuner/advanced-trainer)"
    )


def _spec_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--spec", help="training spec: JSON file or string")
    sp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a spec field")


def _scale_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--scale-steps-to-gpus",
        action="store_true",
        help="divide steps (and step intervals) by the machine's GPU count: the same images in "
        "fewer steps (batch_size is per GPU, so N GPUs see N times the images per step)",
    )


def _account_commands(sub) -> None:
    _provider_args(
        _command(
            sub, "validate", cmd_validate, "check the API token (or the Cog server) and show the account"
        )
    )
    _provider_args(_command(sub, "versions", cmd_versions, "list the trainer model's versions (* = pinned)"))
    sp = _command(sub, "hardware", cmd_hardware, "hardware and prices")
    _provider_args(sp)
    sp.add_argument("--offline", action="store_true", help="only the built-in price table")
    _command(sub, "billing", cmd_billing, "prices and local spend (Replicate has no public balance endpoint)")


def _settings_commands(sub) -> None:
    sp = _command(sub, "token", cmd_token, "save or delete the Replicate API token (secrets file, mode 0600)")
    sp.add_argument("action", choices=["set", "delete"])
    sp.add_argument("--stdin", action="store_true", help="read the token from standard input")
    sp = _command(sub, "config", cmd_config, "show or change settings (public_url, spend_limit, ...)")
    sp.add_argument("action", choices=["show", "set"], nargs="?")
    sp.add_argument("key", nargs="?")
    sp.add_argument("value", nargs="?")


def _dataset_commands(sub) -> None:
    sp = _command(sub, "estimate", cmd_estimate, "estimated time and cost of a spec")
    _spec_args(sp)
    sp.add_argument("--hardware", help="one SKU (default: gpu-l40s, gpu-a100-large, gpu-h100)")
    sp.add_argument("--images", type=int, help="images in the dataset (default 20)")
    sp.add_argument("--cheapest", action="store_true", help="rank every L40S / A100 / H100 machine by cost")
    sp.add_argument(
        "--deadline", metavar="DURATION", help="with --cheapest: only what finishes within it (30m, 2h)"
    )
    _scale_arg(sp)
    sp = _command(sub, "pack", cmd_pack, "pack a dataset folder into an upload-ready zip (<= 100 MiB)")
    sp.add_argument("folder")
    sp.add_argument("--out", help="the zip to write (default: FOLDER.zip)")
    sp.add_argument(
        "--fit",
        action="store_true",
        help="re-encode/downsize images (and re-encode clips as H.264) to fit, never below the spec's largest resolution",
    )
    _spec_args(sp)


def _submit_command(sub) -> None:
    sp = _command(sub, "submit", cmd_submit, "pack, upload and start a training job")
    _provider_args(sp)
    _spec_args(sp)
    sp.add_argument("--dataset", required=True, help="a dataset folder (packed for you) or a zip")
    sp.add_argument(
        "--destination",
        help="owner/name: the Replicate model the training writes a new version of "
        "(default: <your account>/<trigger word or dataset>-<model>; created "
        "private if missing)",
    )
    sp.add_argument(
        "--hardware",
        help="the machine, a Replicate SKU such as gpu-h100-8x; the training goes to its profile's "
        "trainer model (default: settings)",
    )
    _scale_arg(sp)
    sp.add_argument("--fit", action="store_true", help="downsize images if the dataset is over 100 MiB")
    sp.add_argument("--wait", action="store_true", help="follow the job to the end and download its outputs")
    sp.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="return_checkpoint: if the job fails or is canceled, its last checkpoint goes to the spec's "
        "publish target, so `advanced-trainer resume` can carry it on",
    )


def _run_command(sub) -> None:
    sp = _command(
        sub, "run", cmd_run, "render with trained weights: a job id or a model (owner/name[:version])"
    )
    sp.add_argument("target", help="a succeeded training's job id, or a Replicate model owner/name[:version]")
    sp.add_argument("--prompt", required=True)
    sp.add_argument(
        "--image",
        action="append",
        metavar="FILE",
        help="edit models: the image to edit (input_image); again for further references (input_images)",
    )
    sp.add_argument("--num-outputs", type=int, help="images, 1-4 (default 1)")
    sp.add_argument("--seed", type=int)
    sp.add_argument(
        "--aspect-ratio", help="1:1 (default), 16:9, 3:2, ... or custom (with --input width=... height=...)"
    )
    sp.add_argument("--lora-scale", type=float)
    sp.add_argument("--steps", type=int, help="num_inference_steps (default: the model's)")
    sp.add_argument("--guidance", type=float, help="guidance_scale (default: the model's)")
    sp.add_argument("--output-format", choices=["webp", "jpg", "png"])
    sp.add_argument(
        "--lora-step",
        type=int,
        help="render with this kept validation step of the job's LoRA (see its contact sheet; "
        "default: the chosen step)",
    )
    sp.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other input of the run entry (negative_prompt, lora_weights, extra_lora, ...)",
    )
    sp.add_argument(
        "--out",
        help="folder for the images (default: cloud_outputs/<job id>/tries/<id>/ or "
        "cloud_outputs/runs/<id>/)",
    )
    _provider_args(sp)


def _job_commands(sub) -> None:
    for name, fn, hlp in (
        ("status", cmd_status, "a job's status"),
        ("cancel", cmd_cancel, "cancel a job"),
        ("download", cmd_download, "download, verify and unpack a job's outputs"),
    ):
        sp = _command(sub, name, fn, hlp)
        sp.add_argument("id")
        sp.add_argument("--cog-url")
        if name == "status":
            sp.add_argument("--offline", action="store_true", help="only the job store")
        if name == "download":
            sp.add_argument(
                "--step",
                type=int,
                help="a kept validation step to use instead of the chosen one (steps/step-N/)",
            )
    for name, fn, hlp in (
        ("resume", cmd_resume, "carry a failed or canceled training on from its last checkpoint"),
        ("continue", cmd_continue, "train a succeeded resumable training further (--steps N more)"),
    ):
        sp = _command(sub, name, fn, hlp)
        sp.add_argument("id", help="the job to carry on")
        if name == "continue":
            sp.add_argument(
                "--steps", type=int, required=True, help="optimizer steps to train beyond the job's"
            )
        sp.add_argument("--dataset", help="upload this dataset again (default: reuse the job's upload)")
        sp.add_argument("--cog-url")
        sp.add_argument(
            "--wait", action="store_true", help="follow the new job to the end and download its outputs"
        )
    sp = _command(sub, "publish", cmd_publish, "publish a succeeded job's outputs to the Hub or S3 from here")
    sp.add_argument("id")
    sp.add_argument(
        "--hub", metavar="OWNER/NAME", help="a Hugging Face model repo (HF_TOKEN with write access)"
    )
    sp.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")
    sp.add_argument(
        "--s3", metavar="S3://BUCKET/PREFIX", help="an S3-compatible bucket (AWS_ACCESS_KEY_ID / _SECRET_)"
    )
    sp.add_argument("--s3-endpoint-url", help="a non-AWS store's endpoint (MinIO, B2, R2)")
    sp.add_argument("--s3-region")
    sp.add_argument("--s3-public-base-url", help="the bucket's public URL, for the links printed")
    sp.add_argument("--cog-url")
    sp = _command(sub, "logs", cmd_logs, "a job's logs")
    sp.add_argument("id")
    sp.add_argument("--follow", "-f", action="store_true")
    sp.add_argument("--cog-url")
    sp = _command(sub, "jobs", cmd_jobs, "recent jobs from the local store")
    sp.add_argument("--limit", type=int, default=20)
    sp.add_argument(
        "--reconcile",
        action="store_true",
        help="settle submissions interrupted before the provider's answer was recorded: find their "
        "jobs at the provider, or release them so they stop counting against the spend limit",
    )
    sp.add_argument(
        "--older-than",
        type=float,
        default=10,
        metavar="MINUTES",
        help="with --reconcile: only submissions at least this old (default 10)",
    )


def _serve_command(sub) -> None:
    sp = _command(sub, "serve", cmd_serve, "the local server: REST API, webhook receiver, web page")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8080)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog="advanced-trainer",
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_flags(p, after_command=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _account_commands,
        _dataset_commands,
        _submit_command,
        _run_command,
        _job_commands,
        _settings_commands,
        _serve_command,
    ):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args, Settings.load())
        return code or EXIT_OK
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
