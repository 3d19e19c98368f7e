"""advanced-trainer: submit training jobs to Replicate (or any Cog server) and track them.

Exit codes: 0 done; 1 the job failed or was canceled; 2 a problem you can fix (bad spec,
dataset too large, token missing or malformed, spend limit); 3 a remote failure (the API or
network refused or broke).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import pricing
from . import token as tokens
from .config import Settings, store_path

EXIT_OK, EXIT_JOB_FAILED, EXIT_USER, EXIT_REMOTE = 0, 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, code: int):
        self.code = code
        super().__init__(message)


def _out(args, data: Any, human: str | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    elif human is not None:
        print(human)


def _store():
    from .store import JobStore

    return JobStore(store_path())


def make_provider(args, settings: Settings):
    from .providers import CogProvider, ReplicateProvider

    if getattr(args, "provider", "replicate") == "cog":
        url = getattr(args, "cog_url", None) or settings.cog_url
        if not url:
            raise CliError("provider cog needs --cog-url (or `advanced-trainer config set cog_url URL`)", EXIT_USER)
        return CogProvider(url)
    try:
        tok = tokens.resolve()
    except tokens.TokenError as exc:
        raise CliError(str(exc), EXIT_USER) from None
    return ReplicateProvider(tok.value, model=getattr(args, "model", None) or settings.model,
                             version=settings.version, base_url=os.environ.get("REPLICATE_BASE_URL") or None)


def _overrides(items: list[str], flag: str = "--set") -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"{flag} {item!r}: expected NAME=VALUE", EXIT_USER)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# -- commands ------------------------------------------------------------------------------------

def cmd_validate(args, settings):
    from .statuspage import replicate_status

    provider = make_provider(args, settings)
    account = provider.account()
    source = tokens.status().get("source") if provider.name == "replicate" else None
    status = replicate_status() if provider.name == "replicate" else None
    human = (f"token OK ({source}): {account.get('username')} ({account.get('type')}, {account.get('name')})"
             if source else f"reachable: {account.get('name')}")
    if status:
        human += f"\nReplicate status: {status['indicator']} ({status['description']})"
    _out(args, {"ok": True, "account": account, "token_source": source, "replicate_status": status}, human)


def cmd_versions(args, settings):
    provider = make_provider(args, settings)
    versions = provider.versions()
    pinned = settings.version
    _out(args, {"model": getattr(provider, "model", None), "pinned": pinned, "versions": versions},
         "\n".join(f"{'*' if v['id'] == pinned else ' '} {v['id']}  {v.get('created_at') or ''}" for v in versions)
         or "no versions")


def cmd_hardware(args, settings):
    listed = []
    if not args.offline:
        try:
            listed = make_provider(args, settings).hardware()
        except Exception as exc:  # noqa: BLE001 - prices are still useful without the API
            print(f"note: could not list hardware from the API ({exc}); showing the price table", file=sys.stderr)
    names = {h.get("sku"): h.get("name") for h in listed}
    rows = [{"sku": sku, "name": names.get(sku, name), "usd_per_hour": price, "gpus": gpus,
             "listed_by_api": sku in names} for sku, (name, price, gpus) in pricing.HARDWARE.items()]
    _out(args, rows, "\n".join(f"{r['sku']:<20} {r['name']:<28} ${r['usd_per_hour']:>6.2f}/h" for r in rows))


def _spend_summary(store, settings) -> dict:
    from datetime import datetime, timezone

    from .spend import SpendLimit

    now = datetime.now(timezone.utc)
    out = {}
    for period in ("daily", "weekly", "monthly"):
        start = SpendLimit(1.0, period, "warn").period_start(now)
        out[period] = round(store.spend_between(start, now), 4)
    return out


def cmd_billing(args, settings):
    store = _store()
    spend = _spend_summary(store, settings)
    data = {"balance": None, "balance_note": "unavailable: Replicate has no public balance endpoint",
            "local_spend_usd": spend, "spend_limit": settings.spend_limit,
            "prices_usd_per_hour": {k: v[1] for k, v in pricing.HARDWARE.items()}}
    limit = settings.spend_limit
    _out(args, data, "\n".join([
        "balance: unavailable (Replicate has no public balance endpoint)",
        f"spent (local ledger): today ${spend['daily']:.2f}, this week ${spend['weekly']:.2f}, "
        f"this month ${spend['monthly']:.2f}",
        f"spend limit: ${limit['amount_usd']:.2f} per {limit['period']} ({limit['action']})" if limit else "spend limit: none",
    ]))


def cmd_estimate(args, settings):
    from .jobs import load_spec

    spec = load_spec(args.spec, _overrides(args.set))
    n = args.images or 20
    rows = []
    for sku in ([args.hardware] if args.hardware else ["gpu-l40s", "gpu-a100-large", "gpu-h100"]):
        try:
            est = pricing.estimate(spec, sku, n)
        except pricing.UnknownHardware as exc:
            raise CliError(str(exc), EXIT_USER) from None
        rows.append({"hardware": sku, "seconds": round(est.seconds), "usd": round(est.usd, 2)})
        if not args.json:
            print(f"{sku:<16} {est.describe()}")
    if args.json:
        _out(args, rows)


def cmd_pack(args, settings):
    from .jobs import load_spec
    from .pack import PackError, pack_dataset

    spec = load_spec(args.spec, _overrides(args.set))
    folder = Path(args.folder).resolve()
    out = Path(args.out) if args.out else folder.parent / f"{folder.name}.zip"  # beside the folder, never inside
    try:
        result = pack_dataset(folder, out, fit=args.fit, min_side=max(spec.resolutions),
                              progress=_bar("pack") if not args.json else None)
    except PackError as exc:
        raise CliError(str(exc), EXIT_USER) from None
    _out(args, result.to_dict(), result.summary())


def _bar(label: str):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int | None) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=label, unit="B", unit_scale=True, file=sys.stderr)
        bar.update(done - bar.n)
    return update


def _print_update(rec: dict) -> None:
    parts = [f"{rec['id']}: {rec['status']}"]
    phase = rec.get("phase")
    if phase == "train" and rec.get("total"):
        parts.append(f"step {rec['step']}/{rec['total']}")
    elif phase in ("cache", "validate") and rec.get("total"):
        parts.append(f"{phase} {rec['step']}/{rec['total']}")
    elif phase and rec["status"] == "processing":
        parts.append(phase)
    if rec.get("loss") is not None:
        parts.append(f"loss {rec['loss']:.4f}")
    if rec.get("eta_s") is not None and rec["status"] == "processing":
        parts.append(f"ETA {int(rec['eta_s'] // 60)}m{int(rec['eta_s'] % 60):02d}s")
    print("  ".join(parts), file=sys.stderr, flush=True)


def cmd_submit(args, settings):
    from .jobs import UserError, deliver_job, follow, load_spec, submit

    spec = load_spec(args.spec, _overrides(args.set))
    provider = make_provider(args, settings)
    store = _store()
    receiver = None
    webhook = None
    if provider.name == "replicate":
        webhook = settings.webhook_url()
    elif args.wait:
        from .server import CogHookReceiver

        receiver = CogHookReceiver(store, provider)
        webhook = receiver.url
    try:
        sub = submit(store, provider, settings, spec, Path(args.dataset), hardware=args.hardware,
                     destination=args.destination, webhook=webhook, fit=args.fit,
                     log=(lambda m: print(m, file=sys.stderr)))
        rec = sub.record
        if not args.json:
            into = f" into {rec['destination']}" if rec.get("destination") else ""
            print(f"submitted {rec['kind']} {rec['id']}{into} — estimate {sub.estimate.describe()}", file=sys.stderr)
            if not webhook:
                print("no public URL set: following the job by polling", file=sys.stderr)
        if not args.wait:
            _out(args, {"job": rec, "estimate_usd": round(sub.estimate.usd, 2)}, rec["id"])
            return EXIT_OK
        rec = follow(store, provider, rec["id"], on_update=None if args.json else _print_update)
        result: dict[str, Any] = {"job": rec}
        if rec["status"] == "succeeded":
            result["outputs"] = deliver_job(store, rec, progress=_bar("download"))
        human = f"job {rec['id']} {rec['status']}: {rec.get('error') or ''}"
        if rec["status"] == "succeeded":
            human = _describe_outputs(result.get("outputs")) + _try_hint(rec)
        _out(args, result, human)
        return EXIT_OK if rec["status"] == "succeeded" else EXIT_JOB_FAILED
    except UserError as exc:
        raise CliError(str(exc), EXIT_USER) from None
    finally:
        if receiver:
            receiver.close()


def _try_hint(rec: dict) -> str:
    output = json.loads(rec["output_json"]) if rec.get("output_json") else {}
    version = output.get("version") if isinstance(output, dict) else None
    if rec["provider"] == "replicate" and version:
        return (f"\nnew version:        {version}\ntry it:             advanced-trainer run {rec['id']} "
                f"--prompt \"a photo of {_trigger(rec) or 'TOK'}\"")
    return (f"\ntry it:             advanced-trainer run {rec['id']} --provider cog --cog-url <run-mode server> "
            f"--prompt \"a photo of {_trigger(rec) or 'TOK'}\"")


def _trigger(rec: dict) -> str:
    try:
        return json.loads(rec.get("spec_json") or "{}").get("trigger_word") or ""
    except ValueError:
        return ""


def cmd_run(args, settings):
    from .config import outputs_dir
    from .jobs import UserError
    from .run import resolve_target, run

    store = _store()
    try:
        target = resolve_target(store, args.target)
    except UserError as exc:
        raise CliError(str(exc), EXIT_USER) from None
    if target.provider == "cog" or args.provider == "cog":
        args.provider = "cog"
        args.cog_url = args.cog_url or settings.cog_run_url
        if not args.cog_url:
            raise CliError("running on a Cog server needs --cog-url (a server in run mode) or "
                           "`advanced-trainer config set cog_run_url URL`", EXIT_USER)
        if target.provider != "cog":
            raise CliError(f"{args.target} is a Replicate model; a Cog server runs a job's weights "
                           f"(pass a job id)", EXIT_USER)
    provider = make_provider(args, settings)
    inputs = {"prompt": args.prompt, "num_outputs": args.num_outputs, "seed": args.seed,
              "aspect_ratio": args.aspect_ratio, "lora_scale": args.lora_scale,
              "num_inference_steps": args.steps, "guidance_scale": args.guidance,
              "output_format": args.output_format, **_overrides(args.input, "--input")}
    if not args.json:
        print(f"running {target.ref if target.provider == 'replicate' else target.ref + ' on ' + args.cog_url} ...",
              file=sys.stderr)

    def folder_for(pred_id: str) -> Path:
        if args.out:
            return Path(args.out)
        if target.job is not None:
            return outputs_dir() / target.job["id"] / "tries" / pred_id
        return outputs_dir() / "runs" / pred_id

    result = run(provider, target, inputs, folder_for)
    took = (result.prediction.get("metrics") or {}).get("predict_time")
    _out(args, result.to_dict(), f"{len(result.images)} image(s) from {result.prediction.get('id')}"
         + (f" in {took:.1f}s" if took else "") + ":\n" + "\n".join(f"  {p}" for p in result.images))


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
    return "\n".join(lines)


def _job(store, job_id: str) -> dict:
    rec = store.get(job_id)
    if rec is None:
        raise CliError(f"no job {job_id} in the job store ({store_path()})", EXIT_USER)
    return rec


def _provider_for(rec, args, settings):
    args.provider = rec["provider"]
    return make_provider(args, settings)


def cmd_status(args, settings):
    from .jobs import refresh

    store = _store()
    rec = _job(store, args.id)
    if rec["status"] not in ("succeeded", "failed", "canceled") and not args.offline:
        rec = refresh(store, _provider_for(rec, args, settings), args.id)
    _out(args, rec, "\n".join(f"{k}: {rec[k]}" for k in ("id", "kind", "status", "step", "total", "loss", "eta_s",
                                                          "estimate_usd", "cost_usd", "error", "local_dir")
                              if rec.get(k) is not None))


def cmd_logs(args, settings):
    from .jobs import refresh

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
        if not args.follow or obj.get("status") in ("succeeded", "failed", "canceled"):
            return EXIT_OK
        time.sleep(2)
        rec = refresh(store, provider, args.id)


def cmd_cancel(args, settings):
    store = _store()
    rec = _job(store, args.id)
    obj = _provider_for(rec, args, settings).cancel(rec["kind"], args.id)
    merged = store.apply_remote(args.id, obj, "poll")
    rec = merged[0] if isinstance(merged, tuple) else merged
    _out(args, rec, f"{args.id}: {rec['status']}")


def cmd_download(args, settings):
    from .jobs import UserError, deliver_job, refresh

    store = _store()
    rec = _job(store, args.id)
    if rec["status"] not in ("succeeded", "failed", "canceled"):
        rec = refresh(store, _provider_for(rec, args, settings), args.id)
    try:
        info = deliver_job(store, rec, progress=_bar("download"))
    except UserError as exc:
        raise CliError(str(exc), EXIT_USER) from None
    _out(args, info, _describe_outputs(info))


def cmd_jobs(args, settings):
    store = _store()
    if args.reconcile:
        from .jobs import reconcile_stale

        notes = reconcile_stale(store, lambda rec: _provider_for(rec, args, settings), args.older_than * 60)
        print("\n".join(notes) or "no interrupted submissions", file=sys.stderr)
    rows = store.list(limit=args.limit)
    _out(args, rows, "\n".join(
        f"{r['id']:<28} {r['kind']:<10} {r['status']:<10} "
        f"{(str(r.get('step')) + '/' + str(r.get('total'))) if r.get('total') else '':<12} "
        f"${(r.get('cost_usd') if r.get('cost_usd') is not None else r.get('estimate_usd') or 0):.2f}"
        for r in rows) or "no jobs yet")


def cmd_token(args, settings):
    if args.action == "delete":
        had = tokens.delete()
        _out(args, {"deleted": had}, "token deleted from the secrets file" if had else "no saved token")
        return
    value = sys.stdin.readline() if args.stdin else getpass.getpass("Replicate API token (input hidden): ")
    value = value.rstrip("\r\n") if args.stdin else value
    try:
        path = tokens.save(value)
    except tokens.TokenError as exc:
        raise CliError(str(exc), EXIT_USER) from None
    _out(args, {"saved": str(path)}, f"token saved to {path} (mode 0600)")


def cmd_config(args, settings):
    if args.action == "show" or args.action is None:
        from dataclasses import asdict

        _out(args, asdict(settings), json.dumps(asdict(settings), indent=2))
        return
    from .settings_api import apply_settings

    try:
        updated = apply_settings(settings, {args.key: _parse_value(args.value)})
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USER) from None
    updated.save()
    _out(args, {"ok": True}, f"{args.key} saved")


def _parse_value(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def cmd_serve(args, settings):
    from .server import serve

    serve(args.host, args.port)


# -- parser ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advanced-trainer", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def provider_args(sp):
        sp.add_argument("--provider", choices=["replicate", "cog"], default="replicate")
        sp.add_argument("--cog-url", help="the Cog HTTP server (provider cog)")
        sp.add_argument("--model", help="owner/model on Replicate (default: settings, simpletuner/advanced-trainer)")

    def spec_args(sp, required=False):
        sp.add_argument("--spec", required=required, help="training spec: JSON file or string")
        sp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a spec field")

    sp = sub.add_parser("validate", help="check the API token (or the Cog server) and show the account")
    provider_args(sp)
    sp.set_defaults(fn=cmd_validate)
    sp = sub.add_parser("versions", help="list the trainer model's versions (* = pinned)")
    provider_args(sp)
    sp.set_defaults(fn=cmd_versions)
    sp = sub.add_parser("hardware", help="hardware and prices")
    provider_args(sp)
    sp.add_argument("--offline", action="store_true", help="only the built-in price table")
    sp.set_defaults(fn=cmd_hardware)
    sp = sub.add_parser("billing", help="prices and local spend (Replicate has no public balance endpoint)")
    sp.set_defaults(fn=cmd_billing)
    sp = sub.add_parser("estimate", help="estimated time and cost of a spec")
    spec_args(sp)
    sp.add_argument("--hardware")
    sp.add_argument("--images", type=int, help="images in the dataset (default 20)")
    sp.set_defaults(fn=cmd_estimate)
    sp = sub.add_parser("pack", help="pack a dataset folder into an upload-ready zip (<= 100 MiB)")
    sp.add_argument("folder")
    sp.add_argument("--out", help="the zip to write (default: FOLDER.zip)")
    sp.add_argument("--fit", action="store_true", help="re-encode/downsize images to fit, never below the spec's largest resolution")
    spec_args(sp)
    sp.set_defaults(fn=cmd_pack)
    sp = sub.add_parser("submit", help="pack, upload and start a training job")
    provider_args(sp)
    spec_args(sp)
    sp.add_argument("--dataset", required=True, help="a dataset folder (packed for you) or a zip")
    sp.add_argument("--destination", help="owner/name: the Replicate model the training writes a new version of "
                                          "(default: <your account>/<trigger word or dataset>-<model>; created "
                                          "private if missing)")
    sp.add_argument("--hardware", help="for the estimate and a created destination (default: settings)")
    sp.add_argument("--fit", action="store_true", help="downsize images if the dataset is over 100 MiB")
    sp.add_argument("--wait", action="store_true", help="follow the job to the end and download its outputs")
    sp.set_defaults(fn=cmd_submit)
    sp = sub.add_parser("run", help="render with trained weights: a job id or a model (owner/name[:version])")
    sp.add_argument("target", help="a succeeded training's job id, or a Replicate model owner/name[:version]")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--num-outputs", type=int, help="images, 1-4 (default 1)")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--aspect-ratio", help="1:1 (default), 16:9, 3:2, ... or custom (with --input width=... height=...)")
    sp.add_argument("--lora-scale", type=float)
    sp.add_argument("--steps", type=int, help="num_inference_steps (default: the model's)")
    sp.add_argument("--guidance", type=float, help="guidance_scale (default: the model's)")
    sp.add_argument("--output-format", choices=["webp", "jpg", "png"])
    sp.add_argument("--input", "-i", action="append", default=[], metavar="NAME=VALUE",
                    help="any other input of the run entry (negative_prompt, lora_weights, extra_lora, ...)")
    sp.add_argument("--out", help="folder for the images (default: cloud_outputs/<job id>/tries/<id>/ or "
                                  "cloud_outputs/runs/<id>/)")
    provider_args(sp)
    sp.set_defaults(fn=cmd_run)
    for name, fn, hlp in (("status", cmd_status, "a job's status"), ("cancel", cmd_cancel, "cancel a job"),
                          ("download", cmd_download, "download, verify and unpack a job's outputs")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("id")
        sp.add_argument("--cog-url")
        if name == "status":
            sp.add_argument("--offline", action="store_true", help="only the job store")
        sp.set_defaults(fn=fn)
    sp = sub.add_parser("logs", help="a job's logs")
    sp.add_argument("id")
    sp.add_argument("--follow", "-f", action="store_true")
    sp.add_argument("--cog-url")
    sp.set_defaults(fn=cmd_logs)
    sp = sub.add_parser("jobs", help="recent jobs from the local store")
    sp.add_argument("--limit", type=int, default=20)
    sp.add_argument("--reconcile", action="store_true",
                    help="settle submissions interrupted before the provider's answer was recorded: find their "
                         "jobs at the provider, or release them so they stop counting against the spend limit")
    sp.add_argument("--older-than", type=float, default=10, metavar="MINUTES",
                    help="with --reconcile: only submissions at least this old (default 10)")
    sp.set_defaults(fn=cmd_jobs)
    sp = sub.add_parser("token", help="save or delete the Replicate API token (secrets file, mode 0600)")
    sp.add_argument("action", choices=["set", "delete"])
    sp.add_argument("--stdin", action="store_true", help="read the token from standard input")
    sp.set_defaults(fn=cmd_token)
    sp = sub.add_parser("config", help="show or change settings (public_url, spend_limit, ...)")
    sp.add_argument("action", choices=["show", "set"], nargs="?")
    sp.add_argument("key", nargs="?")
    sp.add_argument("value", nargs="?")
    sp.set_defaults(fn=cmd_config)
    sp = sub.add_parser("serve", help="the local server: REST API, webhook receiver, web page")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8080)
    sp.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .jobs import UserError
    from .providers import ProviderError, RemoteUserError

    try:
        settings = Settings.load()
        code = args.fn(args, settings)
        return code or EXIT_OK
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER
    except RemoteUserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER if exc.status in (401, 413, 422) else EXIT_REMOTE
    except ProviderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REMOTE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
