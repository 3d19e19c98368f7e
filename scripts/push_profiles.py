"""Push the trainer image to every hardware profile's Replicate model.

A Replicate model has one hardware setting, so each machine type trains through its own model
(``client.profiles``: ``simpletuner/advanced-trainer`` for the default hardware,
``...-h100-8x``, ``...-l40s-2x`` and so on for the others). For each configured profile this:

1. creates the model when it is missing, with its hardware: ``POST /v1/models`` is the only
   call of Replicate's API that takes a hardware setting (replicate-python 1.0.7 has
   ``models.create(..., hardware=)`` and no update; the API's model object does not even report
   it). The owner must be the token's account.
2. for a model that exists, says so and what hardware it must have: that cannot be read or set
   through the API; check it on the model's settings page.
3. runs ``cog push r8.im/<model>`` from the repository root (Docker and the Cog CLI needed).

    python scripts/push_profiles.py --dry-run      # what it would create, set and push; changes nothing
    python scripts/push_profiles.py                # do it
    python scripts/push_profiles.py --only gpu-h100-8x --only gpu-8x-l40s

The dry run still reads the API (which models exist, the account); it needs the token
(``REPLICATE_API_TOKEN`` or ``advanced-trainer token set``). Exit codes as the CLI's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from replicate.exceptions import ReplicateError  # noqa: E402

from client import token as tokens  # noqa: E402
from client.config import Settings  # noqa: E402
from client.errors import EXIT_OK, EXIT_USER, ClientError, UserError, exit_code  # noqa: E402
from client.profiles import Profile, configured, profile_for  # noqa: E402
from client.providers import ReplicateProvider  # noqa: E402


def plan(provider: ReplicateProvider, profiles: list[Profile], owner: str, visibility: str) -> list[dict]:
    """One entry per profile: what exists, what would be created with which hardware, what is pushed."""
    steps = []
    for p in profiles:
        try:
            provider.client.models.get(p.model)
            exists = True
        except ReplicateError as exc:
            if exc.status != 404:
                raise UserError(f"GET /v1/models/{p.model} failed: HTTP {exc.status}: {exc.detail}") from None
            exists = False
        step = {
            "hardware": p.hardware,
            "model": p.model,
            "exists": exists,
            "push": f"cog push r8.im/{p.model}",
        }
        if exists:
            step["create"] = None
            step["hardware_note"] = (
                f"exists; Replicate's API cannot read or set a model's hardware: check that "
                f"https://replicate.com/{p.model}/settings says {p.hardware}"
            )
        elif p.model.split("/")[0] != owner:
            step["create"] = None
            step["problem"] = f"missing, and its owner is not this token's account ({owner}): create it there"
        else:
            step["create"] = {"visibility": visibility, "hardware": p.hardware}
            step["hardware_note"] = f"created with hardware {p.hardware} (POST /v1/models)"
        steps.append(step)
    return steps


def execute(provider: ReplicateProvider, steps: list[dict], log) -> None:
    if shutil.which("cog") is None:
        raise UserError("the Cog CLI is not on PATH: install it (and Docker) to push, or use --dry-run")
    for step in steps:
        owner, name = step["model"].split("/", 1)
        if step["create"]:
            provider.client.models.create(
                owner=owner,
                name=name,
                visibility=step["create"]["visibility"],
                hardware=step["hardware"],
                description=f"advanced-trainer on {step['hardware']}",
            )
            log(f"created {step['model']} on {step['hardware']}")
        log(f"$ {step['push']}")
        subprocess.run(step["push"].split(), cwd=ROOT, check=True)


def _describe(step: dict, verb: str) -> str:
    lines = [f"{step['hardware']:<18} {step['model']}"]
    if step.get("problem"):
        lines.append(f"{'':<18} cannot create: {step['problem']}")
    elif step["create"]:
        lines.append(
            f"{'':<18} {verb} create it ({step['create']['visibility']}, hardware {step['hardware']})"
        )
    if step.get("hardware_note") and not step["create"]:
        lines.append(f"{'':<18} {step['hardware_note']}")
    lines.append(f"{'':<18} {verb} run: {step['push']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list what would be created, set and pushed")
    ap.add_argument("--only", action="append", default=[], metavar="SKU", help="only these profiles")
    ap.add_argument("--visibility", choices=["private", "public"], default="private")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        settings = Settings.load()
        profiles = [profile_for(settings, sku) for sku in args.only] if args.only else configured(settings)
        provider = ReplicateProvider(
            tokens.resolve().value,
            model=settings.model,
            base_url=os.environ.get("REPLICATE_BASE_URL") or None,
        )
        steps = plan(provider, profiles, provider.account()["username"], args.visibility)
        if args.json:
            print(json.dumps({"dry_run": args.dry_run, "profiles": steps}, indent=2))
        else:
            print("\n".join(_describe(s, "would" if args.dry_run else "will") for s in steps))
        problems = [s for s in steps if s.get("problem")]
        if args.dry_run:
            return EXIT_USER if problems else EXIT_OK
        if problems:
            raise UserError(f"{len(problems)} profile model(s) cannot be created: see above")
        execute(provider, steps, lambda m: print(m, file=sys.stderr))
    except ValueError as exc:  # an unknown SKU in --only
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(exc.cmd)} failed (exit {exc.returncode})", file=sys.stderr)
        return EXIT_USER
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
