"""The main job on the embedded default, end to end on this machine (no account, no GPU):

    tiny base models in weights/  ->  the real Cog HTTP server (this repo's predict.py) on loopback
    ->  advanced-trainer submit --provider cog --wait  (pack, submit, follow the webhooks, download)

and print where the LoRA, the validation images and the loss plot are. `make demo` runs it.
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
    if load_manifest(weights) is None or any(n not in (load_manifest(weights) or {}).get("models", {})
                                             for n in ("tiny-flux-dev", "tiny-flux-schnell", "tiny-sdxl")):
        write_manifest(weights)


def start_cog_server(weights: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "PORT": str(port), "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
           "ADVANCED_TRAINER_WEIGHTS": str(weights), "COG_THROTTLE_RESPONSE_INTERVAL": "0.2",
           "PYTHONPATH": str(ROOT)}
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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


def main() -> int:
    from client.cli import main as cli

    weights = ROOT / "weights"
    print("demo: writing the tiny base models into weights/ ...", flush=True)
    ensure_tiny_weights(weights)
    log_path = Path(tempfile.gettempdir()) / "advanced-trainer-demo-cog.log"
    print("demo: starting the Cog HTTP server (predict.py) on loopback ...", flush=True)
    proc, url = start_cog_server(weights, log_path)
    try:
        print(f"demo: submitting to {url} with the bundled sample dataset ...", flush=True)
        return cli(["submit", "--provider", "cog", "--cog-url", url, "--spec", str(ROOT / "examples" / "demo-spec.json"),
                    "--dataset", str(ROOT / "examples" / "sample-dataset"), "--hardware", "cpu", "--wait"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
