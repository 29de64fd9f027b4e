"""Starts, watches and stops the rollout server for a training run.

`RolloutServerProcess(model_dir)` is a context manager: it starts `python -m rollout_server` as a
subprocess on a free loopback port, waits for Health, and stops it on exit (Shutdown, then
SIGTERM, then SIGKILL of its process group). The child watches its parent (`--parent-pid`) and
stops when the trainer dies, even by SIGKILL, so a crashed run never leaves an engine holding
memory.
`call(fn)` runs `fn(client)`; when the server has died it restarts it, runs `on_restart(client)`
(the trainer re-sends its weights there) and retries once. `connect(address)` wraps a server
someone else runs, with the same interface and no process.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

import grpc

from longrl_jax.rl.rollout_client import RolloutClient, RolloutError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RolloutServerProcess:
    def __init__(self, model_dir: str, *, host: str = "127.0.0.1", port: int | None = None,
                 token: str | None = None, args: Sequence[str] = (), env: dict | None = None,
                 log_path: str | None = None, start_timeout_s: float = 900.0,
                 on_restart: Callable[[RolloutClient], None] | None = None,
                 max_restarts: int = 3):
        self.model_dir = model_dir
        self.host = host
        self.port = port
        self.token = token
        self.args = list(args)
        self.env = env
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.on_restart = on_restart
        self.max_restarts = max_restarts
        self.restarts = 0
        self.process: subprocess.Popen | None = None
        self.client: RolloutClient | None = None
        self._token_file: str | None = None
        self._log = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "RolloutServerProcess":
        if self.port is None:
            self.port = free_port(self.host)
        cmd = [sys.executable, "-m", "rollout_server", "--model_dir", self.model_dir,
               "--host", self.host, "--port", str(self.port), "--parent-pid", str(os.getpid()),
               *self.args]
        if self.token:
            fd, self._token_file = tempfile.mkstemp(prefix="rollout-token-")
            with os.fdopen(fd, "w") as f:
                f.write(self.token)
            cmd += ["--token-file", self._token_file]
        env = dict(os.environ, **(self.env or {}))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if self.log_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            self._log = open(self.log_path, "ab")
        out = self._log or subprocess.DEVNULL
        self.process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop)
        if self.client is None:
            self.client = RolloutClient(self.address, self.token)
        try:
            self.client.wait_until_ready(self.start_timeout_s, process=self.process)
        except RolloutError as e:
            tail = self._log_tail()
            self.stop()
            raise RolloutError(e.code, f"rollout server did not start: {e}{tail}") from None
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self) -> None:
        if self.restarts >= self.max_restarts:
            raise RolloutError(None, f"rollout server died {self.restarts + 1} times; giving up"
                                     f"{self._log_tail()}")
        self.restarts += 1
        self._kill()
        version = self.client.weight_version if self.client else 0
        self.start()
        if self.on_restart is not None:
            self.on_restart(self.client)
        elif version:
            raise RolloutError(None, "the rollout server restarted with its initial weights and "
                                     "no on_restart callback re-sends the trained ones")

    def call(self, fn: Callable[[RolloutClient], object]):
        """fn(client), restarting the server once if it has died (before or during the call)."""
        if not self.alive():
            self.restart()
        try:
            return fn(self.client)
        except RolloutError as e:
            if e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or self.alive():
                raise
            self.restart()
            return fn(self.client)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None and self.client:
            try:
                self.client.shutdown()
                self.process.wait(timeout=30)
            except (RolloutError, subprocess.TimeoutExpired):
                pass
        self._kill()
        if self._token_file and os.path.exists(self._token_file):
            os.remove(self._token_file)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _kill(self) -> None:
        p = self.process
        if p is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            if p.poll() is not None:
                break
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        try:  # the engine's own children live in the same process group
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _log_tail(self, n: int = 15) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        lines = [l for l in lines if "error" in l.lower()] or lines
        return "\n" + "\n".join(lines[-n:])

    def __enter__(self) -> "RolloutServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RemoteRolloutServer:
    """A server started elsewhere: same interface as RolloutServerProcess, nothing to restart."""

    def __init__(self, address: str, *, token: str | None = None, start_timeout_s: float = 300.0,
                 on_restart=None):
        self.address = address
        self.client = RolloutClient(address, token)
        self.start_timeout_s = start_timeout_s

    def start(self) -> "RemoteRolloutServer":
        self.client.wait_until_ready(self.start_timeout_s)
        return self

    def call(self, fn):
        return fn(self.client)

    def stop(self) -> None:
        self.client.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def connect(address: str, **kw) -> RemoteRolloutServer:
    return RemoteRolloutServer(address, **kw)
