"""The main job on the embedded default, end to end on this machine (no account, no GPU):

    tiny base models in weights/  ->  the real Cog HTTP server in train mode (cog_train.py) on loopback
    ->  advanced-trainer submit --provider cog --wait  (pack, train, follow the webhooks, download)
    ->  a Cog server in run mode (predict.py)  ->  advanced-trainer run JOB  (an image with the LoRA)

and print where the LoRA, the validation images, the loss plot and the rendered image are.
`make demo` runs it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_tiny_weights(weights: Path) -> None:
    from train.tiny import write_all
    from train.weights import load_manifest, write_manifest

    write_all(weights)
    if load_manifest(weights) is None or any(
        n not in (load_manifest(weights) or {}).get("models", {})
        for n in ("tiny-flux-dev", "tiny-flux-schnell", "tiny-sdxl")
    ):
        write_manifest(weights)


def start_cog_server(mode: str, weights: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PORT": str(port),
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "COG_TRAIN_TYPE_STUB": "cog_train.py:Trainer",
        "ADVANCED_TRAINER_WEIGHTS": str(weights),
        "ADVANCED_TRAINER_RUN_BASE": "tiny-flux-dev",
        "COG_THROTTLE_RESPONSE_INTERVAL": "0.2",
        "PYTHONPATH": str(ROOT),
    }
    log = open(log_path, "wb")
    args = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"] + (
        ["--x-mode", "train"] if mode == "train" else []
    )
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the Cog server exited; see {log_path}")
        try:
            status = httpx.get(url + "/health-check", timeout=2).json().get("status")
        except httpx.HTTPError:
            status = None
        if status == "READY":
            return proc, url
        if status == "SETUP_FAILED":
            raise SystemExit(f"the Cog server's setup failed; see {log_path}")
        time.sleep(0.2)
    raise SystemExit(f"the Cog server did not become ready; see {log_path}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    from client.cli import main as cli

    weights = ROOT / "weights"
    print("demo: writing the tiny base models into weights/ ...", flush=True)
    ensure_tiny_weights(weights)
    logs = Path(tempfile.gettempdir())
    print("demo: starting the Cog HTTP server in train mode (cog_train.py) on loopback ...", flush=True)
    proc, url = start_cog_server("train", weights, logs / "advanced-trainer-demo-cog-train.log")
    try:
        print(f"demo: submitting a training to {url} with the bundled sample dataset ...", flush=True)
        code = cli(
            [
                "submit",
                "--provider",
                "cog",
                "--cog-url",
                url,
                "--spec",
                str(ROOT / "examples" / "demo-spec.json"),
                "--dataset",
                str(ROOT / "examples" / "sample-dataset"),
                "--hardware",
                "cpu",
                "--wait",
            ]
        )
        if code != 0:
            return code
    finally:
        stop(proc)
    from client.config import store_path
    from client.store import JobStore

    job = JobStore(store_path()).list(limit=1)[0]  # the training just finished

    print("demo: starting the Cog HTTP server in run mode (predict.py) to try the LoRA ...", flush=True)
    proc, url = start_cog_server("run", weights, logs / "advanced-trainer-demo-cog-run.log")
    try:
        return cli(
            [
                "run",
                job["id"],
                "--provider",
                "cog",
                "--cog-url",
                url,
                "--prompt",
                "sks, a red circle on a blue background",
                "--seed",
                "1",
                "--steps",
                "8",
                "--output-format",
                "png",
                "-i",
                "aspect_ratio=custom",
                "-i",
                "width=64",
                "-i",
                "height=64",
            ]
        )
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
