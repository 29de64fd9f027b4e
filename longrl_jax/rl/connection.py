"""The trainer's rollout connection: one object that owns the rollout server for a run.

`RolloutConnection(config, workdir, tokenizer_dir)` starts `python -m rollout_server` from an HF
export of the policy (or connects to `config.rollout.address`), pushes the policy's weights as
numbered versions (`sync`), sends each video's embedding once and asks for samples of spliced
prompts (`generate`). It is the run's one record of what the server holds (the weight version it
serves, the embeddings it was sent) and the one place that recovers: after any failure (process
gone, UNAVAILABLE, a broken engine, a timeout) it restarts the server (or reconnects to a remote
one), re-sends the current weights at the current version and the embeddings the call needs, and
retries the call, `rollout.max_attempts` times in all before failing the run with the last error.
Restarts and retries are counted (`counters()`: `rollout/server_restarts`, `rollout/retries`).

`RolloutServerProcess(model_dir)` is the process alone, a context manager: a free loopback port,
Health polled until ready, Shutdown then SIGTERM then SIGKILL of its process group on exit. The
child watches its parent (`--parent-pid`), so a trainer killed by SIGKILL leaves no engine
holding memory. `RemoteRolloutServer(address)` is a server started elsewhere.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Sequence

import grpc
import numpy as np

import rollout_server
from longrl_jax.models import hf
from longrl_jax.rl.rollout_client import (
    RolloutClient,
    RolloutError,
    StaleWeightsError,
    spliced_prompt,
)

# Failures of the server rather than of the request: recovered by a restart (or reconnect). A
# client error (INVALID_ARGUMENT, ...) is a bug on this side and is raised at once.
SERVER_FAILURES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                   grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                   None)   # None: the process exited or never became ready

# ================================================================================================
# The run's connection
# ================================================================================================

class RolloutConnection:
    """The rollout server of a run, fed the policy's weights and the videos' embeddings.

    The server starts from an HF export of the current LLM (plus tokenizer) in the workdir, so it
    serves exactly the trainer's weights from its first request (version 0); later versions are
    arrays from the same mapping table as the export (`hf.hf_arrays`). After a restart the
    current weights are read from the model `sync` last pushed: between syncs the trainer only
    samples (the update comes after the step's rollouts), so the model still holds the version's
    weights whenever a call can fail."""

    def __init__(self, config, workdir: str, tokenizer_dir: str):
        self.config = config
        self.workdir = workdir
        self.tokenizer_dir = tokenizer_dir
        self.server: RolloutServerProcess | RemoteRolloutServer | None = None
        self.version = 0                  # the version the run serves; every sample must be it
        self.held: set[str] = set()       # embedding keys the server holds (as far as we know)
        self.server_restarts = 0
        self.retries = 0
        self.last_sync_bytes = 0
        self.max_attempts = int(config.rollout.get("max_attempts", 4))
        self._served: int | None = None   # the server's version; None: unknown (ask it)
        self._failed = False              # the server failed: restart (or reconnect) first
        self._model = None

    @property
    def client(self) -> RolloutClient:
        return self.server.client

    def follow(self, version: int) -> None:
        """Serve `version`, pushed to the server by another process that owns it (several
        processes sharing one server): samples must come from it."""
        self.version = self._served = version

    def counters(self) -> dict[str, float]:
        """Run totals, for the metrics."""
        return {"rollout/server_restarts": float(self.server_restarts),
                "rollout/retries": float(self.retries)}

    # ---- start and stop -------------------------------------------------------------------------

    def start(self, model) -> None:
        r = self.config.rollout
        self._model = model
        if r.address:
            self.server = RemoteRolloutServer(r.address, token=r.token or None,
                                              ca_file=r.get("ca_file") or None).start()
            self.version = self._served = self.client.info().weight_version
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
            log_path=os.path.join(self.workdir, "rollout_server.log")).start()
        self.version = self._served = self.client.info().weight_version

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    # ---- the calls --------------------------------------------------------------------------------

    def sync(self, model) -> float:
        """Pushes the policy's LLM weights as the next version; returns the bytes sent."""
        self._model = model
        self.version += 1
        self.last_sync_bytes = 0
        self._with_recovery("weight sync", lambda c: None)
        return float(self.last_sync_bytes)

    def generate(self, prompts, **kw):
        """Per prompt, the `Sample`s of the current weight version (stale ones are refused)."""
        segs = [spliced_prompt(p.layout, p.video_key) for p in prompts]
        outs = self._with_recovery(
            "rollout", lambda c: c.generate(segs, min_weight_version=self.version, **kw), prompts)
        got = {s.weight_version for group in outs for s in group}
        if got - {self.version}:
            raise StaleWeightsError(None, f"samples of weight versions {sorted(got)}; the run "
                                          f"serves {self.version}")
        return outs

    # ---- recovery ---------------------------------------------------------------------------------

    def _with_recovery(self, what: str, call, prompts=()):
        """call(client) once the server is up, serving `self.version` and holding the prompts'
        embeddings; after a server failure, recovers and tries again (bounded)."""
        last = None
        for attempt in range(self.max_attempts):
            if attempt:
                self.retries += 1
            try:
                if self._failed or not self.server.alive():
                    self._recover()
                elif self._served is None:
                    self._served = self.client.info().weight_version
                self._push_weights()
                self._send_embeddings(prompts)
                return call(self.client)
            except StaleWeightsError as e:   # the server lost our weights behind our back
                last, self._served = e, None
                self.held.clear()
            except RolloutError as e:
                if e.code == grpc.StatusCode.NOT_FOUND and prompts:   # evicted embeddings
                    last = e
                    self.held.difference_update(p.video_key for p in prompts)
                    continue
                if e.code not in SERVER_FAILURES:
                    raise
                last, self._failed = e, True
        restarts = f"{self.server_restarts} server restart(s) so far"
        raise RolloutError(last.code, f"{what} failed {self.max_attempts} times ({restarts}); "
                                      f"last error: {last}")

    def _recover(self) -> None:
        """A restarted (or re-reached) server: its version read back, its embeddings unknown."""
        self._served = None
        self.held.clear()
        if self.server.restart():
            self.server_restarts += 1
        self._served = self.client.info().weight_version
        self._failed = False

    def _push_weights(self) -> None:
        if self._served == self.version:
            return
        if self._served > self.version:
            raise RolloutError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the rollout server serves weight version {self._served}, newer "
                               f"than this run's {self.version}: another trainer updates it")
        arrays = hf.hf_arrays(self._model, "llm", dtype=np.dtype(self.config.rollout.dtype))
        reply = self.client.update_weights(arrays, self.version)
        self._served = reply.weight_version
        self.last_sync_bytes = reply.nbytes

    def _send_embeddings(self, prompts) -> None:
        for p in prompts:
            if p.video_key not in self.held:
                self.client.put_embeddings(p.video_key, p.video)
                self.held.add(p.video_key)


# ================================================================================================
# The server process
# ================================================================================================

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RolloutServerProcess:
    """`python -m rollout_server` as a child process; `restart()` replaces it on the same port."""

    def __init__(self, model_dir: str, *, host: str = "127.0.0.1", port: int | None = None,
                 token: str | None = None, args: Sequence[str] = (), env: dict | None = None,
                 log_path: str | None = None, start_timeout_s: float = 900.0,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 ca_file: str | None = None, connect_host: str | None = None):
        self.model_dir = model_dir
        self.host = host                  # bound by the server
        self.connect_host = connect_host or host   # dialled (e.g. 127.0.0.1 for a 0.0.0.0 bind)
        self.port = port
        self.token = token
        self.args = list(args)
        self.env = env
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.tls = (tls_cert, tls_key, ca_file)
        self.restarts = 0
        self.process: subprocess.Popen | None = None
        self.client: RolloutClient | None = None
        self._token_file: str | None = None
        self._log = None
        self._atexit = False

    @property
    def address(self) -> str:
        return f"{self.connect_host}:{self.port}"

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "RolloutServerProcess":
        if self.port is None:
            self.port = free_port(self.host)
        cmd = [sys.executable, "-m", "rollout_server", "--model_dir", self.model_dir,
               "--host", self.host, "--port", str(self.port), "--parent-pid", str(os.getpid()),
               *self.args]
        if self.token:
            if self._token_file is None:
                fd, self._token_file = tempfile.mkstemp(prefix="rollout-token-")
                with os.fdopen(fd, "w") as f:
                    f.write(self.token)
            cmd += ["--token-file", self._token_file]
        cert, key, ca = self.tls
        if cert:
            cmd += ["--tls-cert", cert, "--tls-key", key]
        env = dict(os.environ, **(self.env or {}))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        # the server's code is the checkout this trainer's client comes from, whatever the cwd
        root = os.path.dirname(os.path.dirname(os.path.abspath(rollout_server.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        if self.log_path and self._log is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            self._log = open(self.log_path, "ab")
        out = self._log or subprocess.DEVNULL
        self.process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        if self.client is not None:   # a fresh channel: the old one may sit in reconnect backoff
            self.client.close()
        self.client = RolloutClient(self.address, self.token, ca_file=ca)
        try:
            self.client.wait_until_ready(self.start_timeout_s, process=self.process)
        except RolloutError as e:
            tail = self._log_tail()
            self.stop()
            raise RolloutError(e.code, f"rollout server did not start: {e}{tail}") from None
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self) -> bool:
        """Kills what is left of the server (its engine processes included) and starts a new
        one; True (a restart happened)."""
        self.restarts += 1
        self._kill()
        self.start()
        return True

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
            self._token_file = None
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
    """A server started elsewhere: same interface as RolloutServerProcess; a "restart" waits
    until it answers again (whoever runs it restarts it)."""

    def __init__(self, address: str, *, token: str | None = None, ca_file: str | None = None,
                 start_timeout_s: float = 300.0):
        self.address = address
        self.client = RolloutClient(address, token, ca_file=ca_file)
        self.start_timeout_s = start_timeout_s

    def start(self) -> "RemoteRolloutServer":
        self.client.wait_until_ready(self.start_timeout_s)
        return self

    def alive(self) -> bool:
        return True

    def restart(self) -> bool:
        self.client.wait_until_ready(self.start_timeout_s)
        return False

    def stop(self) -> None:
        self.client.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
