"""A warm trainer for the Cog train entry: ``python -m train`` without paying for its imports.

``import train.loop`` (torch, diffusers, transformers, peft, accelerate) costs 6 to 10 s of one core
before a training does anything. The Cog train entry's setup starts this module as a process
(``python -m train.zygote FD``) that imports all of that once and then waits. Each job is a
``fork()`` of it: the child starts a new session, points its stdout and stderr at the pipe the service
relays, takes the job's environment (secrets included) and working folder, and runs
``train.__main__.main`` on the job's arguments. What the child runs is exactly ``python -m train``;
only the imports are inherited. Imports may read the environment (our weights folder,
huggingface_hub's endpoint and cache), so the service forks only a job whose environment equals the
warm process's but for its secrets (``service.JOB_ONLY_ENV``, read when used); any other difference
starts a fresh process.

Fork safety: the zygote is single-threaded in Python and initialises no CUDA (importing torch does
not; ``tests/test_zygote.py`` checks that the preload asks torch for no device), so a forked child
starts CUDA as a fresh process would. A zygote that finds CUDA initialised after its imports refuses
to serve, and the service falls back to a fresh process, as it does for data-parallel jobs (torch's
launcher) and whenever the zygote is gone.

Protocol (a ``SOCK_SEQPACKET`` socket pair, one message a packet): the service sends
``{"args", "env", "cwd"}`` with the write end of an output pipe attached; the zygote answers
``{"pid"}``, then ``{"exit"}`` with the child's exit code when it has reaped it. The zygote says
``{"ready": true}`` once its imports are done and exits when the service's end closes.

This module stays torch-free: the service imports it; only ``serve`` imports the trainer.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

PRELOAD = ("train.__main__", "train.loop", "train.models")
_MAX_MESSAGE = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


class ZygoteChild:
    """A trainer forked by the zygote, with the part of ``subprocess.Popen``'s interface the service
    uses (``pid``, ``poll``, ``wait``). Its exit code arrives as a message; a zygote that vanishes
    mid-job leaves the child to init, and the exit code reads -1."""

    def __init__(self, pid: int, channel: socket.socket):
        self.pid = pid
        self.returncode: int | None = None
        self._channel = channel

    def _read(self, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        ready, _, _ = select.select([self._channel], [], [], timeout)
        if not ready:
            return
        data = self._channel.recv(_MAX_MESSAGE)
        self.returncode = json.loads(data)["exit"] if data else -1

    def poll(self) -> int | None:
        self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._read(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(["python", "-m", "train"], timeout or 0)
        return self.returncode


class Zygote:
    """The service's end: starts the zygote process and forks one trainer a job from it."""

    def __init__(self, env: dict[str, str] | None = None):
        self._channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "train.zygote", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},  # (its own output)
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a job's cancel signals the job's group, never this one
        )
        theirs.close()
        self.env = dict(os.environ if env is None else env)  # what its imports read
        self.ready: bool | None = None  # None until the zygote says (or fails to say) it is ready
        self.busy = False

    def wait_ready(self, timeout: float) -> bool:
        """True once the zygote has imported the trainer; False if it died or refused."""
        if self.ready is None:
            ready, _, _ = select.select([self._channel], [], [], timeout)
            data = self._channel.recv(_MAX_MESSAGE) if ready else b""
            self.ready = bool(data) and bool(json.loads(data).get("ready"))
            if not self.ready:
                self.close()
        return self.ready

    def start(self, args: list[str], env: dict[str, str], output_fd: int) -> ZygoteChild:
        """Fork ``python -m train ARGS`` with ``env``; its stdout and stderr go to ``output_fd``."""
        request = json.dumps({"args": args, "env": env, "cwd": str(ROOT)}).encode()
        socket.send_fds(self._channel, [request], [output_fd])
        while True:
            data = self._channel.recv(_MAX_MESSAGE)
            if not data:
                self.ready = False
                raise OSError("the warm trainer process is gone")
            message = json.loads(data)
            if "pid" in message:  # (an earlier child's late exit report is skipped)
                return ZygoteChild(message["pid"], self._channel)

    def close(self) -> None:
        self.ready = False
        self._channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()


# -- the zygote process --------------------------------------------------------------------------------


def _run_child(request: dict, output_fd: int) -> None:
    """In the forked child: become ``python -m train ARGS`` in its own session, then exit."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)
    os.close(devnull)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    from train import __main__ as entry

    sys.argv = [entry.__file__, *request["args"]]
    try:
        code = entry.main(list(request["args"]))
    except SystemExit as exc:  # argparse's errors, sys.exit in the trainer
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the child reports every failure as python -m train would
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _send(channel: socket.socket, message: dict) -> None:
    try:
        channel.send(json.dumps(message).encode())
    except OSError:
        pass  # the service is gone; the loop ends on its next read


def serve(fd: int) -> int:
    """Import the trainer, say ready, then fork one trainer for each request until the service leaves."""
    channel = socket.socket(fileno=fd)
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    if torch.cuda.is_initialized():  # a fork would inherit a CUDA context it cannot use
        _send(channel, {"ready": False, "reason": "CUDA initialised by an import"})
        return 1
    _send(channel, {"ready": True})
    children: set[int] = set()
    while True:
        ready, _, _ = select.select([channel], [], [], 0.2)
        if ready:
            data, fds, _, _ = socket.recv_fds(channel, _MAX_MESSAGE, 1)
            if not data:
                return 0
            pid = os.fork()
            if pid == 0:
                channel.close()
                _run_child(json.loads(data), fds[0])
            for f in fds:
                os.close(f)
            children.add(pid)
            _send(channel, {"pid": pid})
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                _send(channel, {"exit": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
