"""A real S3-compatible HTTP server on loopback, with authentication enforced, for the publish tests.

moto's standalone server (``python -m moto.server``) runs as a subprocess. It checks SigV4
signatures and IAM policies once ``INITIAL_NO_AUTH_ACTION_COUNT`` unauthenticated actions have
been served; :func:`start` spends exactly those free actions creating

    * an IAM user ``trainer`` with an inline policy allowing ``s3:*`` and an access key (``keys``),
    * an IAM user ``nobody`` with an access key and no policy (``denied_keys``),
    * the bucket,

then checks that enforcement is on: a made-up key must be refused (InvalidAccessKeyId), the
``nobody`` key must be denied (AccessDenied) and the ``trainer`` key must work. If any of that
does not hold, :func:`start` raises instead of handing out a server that accepts anything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

REGION = "us-east-1"
_BOOTSTRAP_ACTIONS = 6  # create_user x2, put_user_policy, create_access_key x2, create_bucket


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    denied_access_key_id: str
    denied_secret_access_key: str
    region: str = REGION
    process: subprocess.Popen | None = field(default=None, repr=False)

    def client(self, access_key_id: str | None = None, secret_access_key: str | None = None):
        """A path-style SigV4 client; the ``trainer`` keys unless others are given."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=access_key_id or self.access_key_id,
            aws_secret_access_key=secret_access_key or self.secret_access_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "total_max_attempts": 1},
            ),
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, log, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise RuntimeError(f"moto server exited with {proc.returncode}:\n{err[-2000:]}")
        try:
            # /moto-api/ is moto's dashboard: answering it does not count as an AWS action.
            with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server at {url} did not answer within {timeout:.0f}s") from None
            time.sleep(0.05)


def start(bucket: str = "trainer-outputs", timeout: float = 20.0) -> S3Server:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_BOOTSTRAP_ACTIONS)
    log = tempfile.TemporaryFile()  # werkzeug logs every request to stderr: a file never fills up like a pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    log_closed = False
    try:
        _wait_until_up(proc, log, endpoint, timeout)
        log.close()  # the child keeps its own descriptor
        log_closed = True

        # The free, unauthenticated actions (any keys are accepted for these).
        anon = dict(
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
            config=Config(
                retries={"mode": "standard", "total_max_attempts": 1}, s3={"addressing_style": "path"}
            ),
        )
        iam = boto3.session.Session().client("iam", **anon)
        iam.create_user(UserName="trainer")
        iam.put_user_policy(
            UserName="trainer",
            PolicyName="s3-all",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.create_user(UserName="nobody")
        denied = iam.create_access_key(UserName="nobody")["AccessKey"]
        boto3.session.Session().client("s3", **anon).create_bucket(Bucket=bucket)

        server = S3Server(
            endpoint,
            bucket,
            key["AccessKeyId"],
            key["SecretAccessKey"],
            denied["AccessKeyId"],
            denied["SecretAccessKey"],
            process=proc,
        )
        _check_auth_enforced(server, ClientError)
        return server
    except BaseException:
        proc.kill()
        proc.wait(timeout=5)
        if not log_closed:
            log.close()
        raise


def _check_auth_enforced(server: S3Server, ClientError: type) -> None:
    probes = [
        ("made-up key", "AKIAMADEUPMADEUP0000", "x" * 40, "InvalidAccessKeyId"),
        ("no-policy user", server.denied_access_key_id, server.denied_secret_access_key, "AccessDenied"),
    ]
    for label, ak, sk, expected in probes:
        try:
            server.client(ak, sk).put_object(Bucket=server.bucket, Key="auth-probe", Body=b"x")
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code != expected:
                raise RuntimeError(f"moto refused the {label} with {code}, expected {expected}") from e
        else:
            raise RuntimeError(f"moto accepted a PutObject from the {label}: authentication is not enforced")
    c = server.client()
    c.put_object(Bucket=server.bucket, Key="auth-probe", Body=b"x")
    c.delete_object(Bucket=server.bucket, Key="auth-probe")


class PublicGateway:
    """A read-only public HTTP front for the bucket, as a CDN or a bucket's public domain (R2, B2, a
    CloudFront distribution) serves it: ``GET {url}/{key}`` answers the object without credentials.
    moto cannot serve anonymous reads itself (a public-read bucket policy makes it answer 500), so
    this reads with the server's own keys. Use it as ``s3_public_base_url``."""

    def __init__(self, server: S3Server) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import unquote

        client = server.client()
        gets: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                key = unquote(self.path.split("?", 1)[0].lstrip("/"))
                gets.append(key)
                try:
                    body = client.get_object(Bucket=server.bucket, Key=key)["Body"].read()
                    status = 200
                except Exception:  # noqa: BLE001 - a missing key (or anything else): 404, as a CDN says
                    body, status = b"not found", 404
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
                pass

        self.gets = gets
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
