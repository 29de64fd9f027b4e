"""The trainer's rollout connection: one object that owns the rollout server for a run.

`RolloutConnection(config, workdir, tokenizer_dir)` starts `python -m rollout_server` from an HF export of
the policy (or connects to `config.rollout.address`), pushes the policy's weights as numbered
versions (`sync`), sends each video's embedding once and asks for samples of spliced prompts
(`generate`). The serving weight version and the embeddings the server holds are the client's
(`RolloutClient.weight_version`, its record of sent embeddings); nothing here keeps a copy.

`RolloutServerProcess(model_dir)` is the process side, a context manager: a free loopback port,
Health polled until ready, Shutdown then SIGTERM then SIGKILL of its process group on exit. The
child watches its parent (`--parent-pid`), so a trainer killed by SIGKILL leaves no engine
holding memory. `call(fn)` runs `fn(client)`; when the server has died it restarts it, runs
`on_restart(client)` (the run re-sends its weights there) and retries once.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Callable, Sequence

import grpc
import numpy as np

from longrl_jax.models import hf
from longrl_jax.rl.rollout_client import RolloutClient, RolloutError, spliced_prompt

# ================================================================================================
# The run's connection
# ================================================================================================

class RolloutConnection:
    """The rollout server of a run, fed the policy's weights and the videos' embeddings.

    The server starts from an HF export of the current LLM (plus tokenizer) in the workdir, so it
    serves exactly the trainer's weights from its first request; later syncs send arrays from
    the same mapping table as the export (`hf.hf_arrays`)."""

    def __init__(self, config, workdir: str, tokenizer_dir: str):
        self.config = config
        self.workdir = workdir
        self.tokenizer_dir = tokenizer_dir
        self.server: RolloutServerProcess | RemoteRolloutServer | None = None
        self._model = None

    @property
    def client(self) -> RolloutClient:
        return self.server.client

    @property
    def version(self) -> int:
        """The weight version the server serves (and every sample must come from)."""
        return self.client.weight_version

    def start(self, model) -> None:
        r = self.config.rollout
        self._model = model
        if r.address:
            self.server = RemoteRolloutServer(r.address, token=r.token or None).start()
            self.client.read_weight_version()   # a running server may serve a later version
            self.sync(model)
            return
        serve_dir = os.path.join(self.workdir, "serve")
        hf.save_pretrained(model, serve_dir, dtype=np.dtype(r.dtype),
                           tokenizer_dir=self.tokenizer_dir)
        args = ["--max-model-len", str(r.max_model_len), "--dtype", r.dtype,
                "--seed", str(self.config.seed)]
        if r.block_size:
            args += ["--block-size", str(r.block_size)]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(r.kvcache_gib)}
        if r.cpu_threads_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = r.cpu_threads_bind
        self.server = RolloutServerProcess(
            serve_dir, args=args, env=env, port=r.port or None,
            log_path=os.path.join(self.workdir, "rollout_server.log"),
            on_restart=self._resend).start()
        self.client.read_weight_version()

    def _resend(self, client: RolloutClient) -> None:
        """After a restart: the current weights again, at the current version (the client
        re-sends lost embeddings itself when a Generate names one)."""
        if self._model is not None and client.weight_version:
            client.update_weights(self._arrays(self._model), client.weight_version)

    def _arrays(self, model) -> dict[str, np.ndarray]:
        return hf.hf_arrays(model, "llm", dtype=np.dtype(self.config.rollout.dtype))

    def sync(self, model) -> float:
        """Pushes the policy's LLM weights as the next version; returns the bytes sent."""
        self._model = model
        arrays = self._arrays(model)
        reply = self.server.call(lambda c: c.update_weights(arrays, c.weight_version + 1))
        return float(reply.nbytes)

    def put_videos(self, prompts) -> None:
        for p in prompts:
            if not self.client.sent(p.video_key):
                self.server.call(lambda c, p=p: c.put_embeddings(p.video_key, p.video))

    def generate(self, prompts, **kw):
        """Per prompt, the `Sample`s of the current weight version (stale ones are refused)."""
        self.put_videos(prompts)
        segs = [spliced_prompt(p.layout, p.video_key) for p in prompts]
        return self.server.call(lambda c: c.generate(segs, min_weight_version=c.weight_version,
                                                     **kw))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


# ================================================================================================
# The server process
# ================================================================================================

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
        self.client.server_restarted()
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

    def __init__(self, address: str, *, token: str | None = None, start_timeout_s: float = 300.0):
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
