"""Cold-boot fetch benchmark: one stream vs parallel ranges vs unpacking while it arrives.

    python -m bench.fetch [--size-gib 2] [--rate-mb 50] [--connections 16] [--keep DIR]

A loopback server (bench/rangeserver.py) caps each connection at ``--rate-mb`` MB/s, as a CDN or an
object store does, and serves a ``--size-gib`` tar of a pipeline folder (random bytes: nothing to
gain from compression). Each case runs in a fresh process so its peak memory (ru_maxrss) is its own:

- ``single``: one stream (``train.http.download``) for ``--single-seconds`` seconds: its rate;
- ``parallel``: ``train.fetch.fetch_file`` of the whole archive: rate, peak memory, peak disk;
- ``stream``: ``train.weights.fetch_weights_archive`` of the ``.tar`` URL, unpacked while it arrives:
  time to a usable pipeline folder, peak memory, peak disk against the unpacked size.

Prints one JSON line per case and a table; figures are ratios against ``single`` on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from .rangeserver import RangeServer, random_file


def _disk_usage(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


class _DiskPeak:
    """The largest on-disk size of ``folder`` seen while the case runs (sampled every 0.2 s)."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self.stop = folder, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, _disk_usage(self.folder))

    def done(self) -> int:
        self.stop.set()
        self.thread.join()
        return max(self.peak, _disk_usage(self.folder))


def _case(kind: str, url: str, out: Path, seconds: float, connections: int) -> dict:
    """One case, in this (fresh) process."""
    from train.fetch import fetch_file
    from train.http import DownloadError, download

    out.mkdir(parents=True, exist_ok=True)
    disk = _DiskPeak(out)
    started = time.monotonic()
    got = 0
    if kind == "single":

        class Enough(Exception):  # not an OSError: the download's retry policy must not retry it
            pass

        def stop_after(done: int, _total: int | None) -> None:
            nonlocal got
            got = done
            if time.monotonic() - started > seconds:
                raise Enough

        try:
            download(url, out / "single.bin", progress=stop_after)
        except (Enough, DownloadError):
            pass
    elif kind == "parallel":
        got = fetch_file(url, out / "archive.tar", connections=connections).stat().st_size
    else:
        from train.weights import fetch_weights_archive

        os.environ["ADVANCED_TRAINER_FETCH_CONNECTIONS"] = str(connections)
        fetch_weights_archive(url, out / "weights")
        got = sum(p.stat().st_size for p in (out / "weights").rglob("*") if p.is_file())
    took = time.monotonic() - started
    peak_disk = disk.done()
    return {
        "case": kind,
        "seconds": round(took, 2),
        "bytes": got,
        "mb_per_s": round(got / 1e6 / took, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_disk_gib": round(peak_disk / 2**30, 3),
    }


def _archive(folder: Path, size: int) -> tuple[Path, int]:
    """A tar of one pipeline folder (model_index.json + four shards of random bytes)."""
    pipe = folder / "bench-pipeline"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text('{"_class_name": "FluxPipeline"}\n')
    for i in range(4):
        random_file(pipe / "transformer" / f"shard-{i}.safetensors", size // 4, seed=i)
    archive = folder / "bench-pipeline.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(pipe, arcname="bench-pipeline")
    unpacked = sum(p.stat().st_size for p in pipe.rglob("*") if p.is_file())
    shutil.rmtree(pipe)
    return archive, unpacked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fetch", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rate-mb", type=float, default=50.0, help="per-connection cap, MB/s")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--single-seconds", type=float, default=10.0)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(_case(args.case, args.url, Path(args.out), args.single_seconds, args.connections)))
        return 0
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building a {args.size_gib:g} GiB archive in {work} ...", file=sys.stderr)
        archive, unpacked = _archive(work, int(args.size_gib * 2**30))
        rows = []
        with RangeServer({archive.name: archive}, rate=args.rate_mb * 1e6) as server:
            url = f"{server.url}/{archive.name}"
            for case in ("single", "parallel", "stream"):
                out = work / case
                cmd = [sys.executable, "-m", "bench.fetch", "--case", case, "--url", url, "--out", str(out)]
                cmd += ["--single-seconds", str(args.single_seconds), "--connections", str(args.connections)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
        single = rows[0]["mb_per_s"]
        print(
            f"\narchive {archive.stat().st_size / 2**30:.2f} GiB (unpacked {unpacked / 2**30:.2f} GiB), "
            f"cap {args.rate_mb:g} MB/s per connection, {args.connections} connections"
        )
        print(f"{'case':<10}{'s':>8}{'MB/s':>9}{'x single':>10}{'peak RSS MiB':>14}{'peak disk GiB':>15}")
        for r in rows:
            print(
                f"{r['case']:<10}{r['seconds']:>8}{r['mb_per_s']:>9}{r['mb_per_s'] / single:>10.1f}"
                f"{r['peak_rss_mib']:>14}{r['peak_disk_gib']:>15}"
            )
        print(f"stream: peak disk / unpacked size = {rows[2]['peak_disk_gib'] * 2**30 / unpacked:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
