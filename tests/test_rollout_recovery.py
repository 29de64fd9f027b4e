"""Reliability drills on real processes: the rollout server dies or breaks during RL, a trainer
is SIGKILLed, and nothing is lost.

`test_rl_run_survives_server_faults` runs `python -m longrl_jax.main` (the demo's quick config,
RL only) and, during it, SIGKILLs the real server from outside once, has it SIGKILL itself during
an UpdateWeights once, and has a weight load fail after validation once (the server then exits
with status 3 rather than staying up broken): fault drills named in `LONGRL_ROLLOUT_FAULTS`
(rollout_server/service.py). The run must finish every step, count the restarts, serve the
same weight version sequence as an undisturbed run, and score its samples with the trainer's
own weights after every restart (the log-prob mismatch stays at float32 noise: a restarted
server left on its initial weights would be far off).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from rollout_fixtures import server_env, write_served_qwen2

RL_STEPS = 5


def _rl_rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    from longrl_jax.metrics import read_metrics
    return [r for r in read_metrics(path) if r["stage"] == "rl"]


def _server_pids(workdir: str) -> list[int]:
    path = os.path.join(workdir, "rollout_server.log")
    if not os.path.exists(path):
        return []
    return [int(p) for p in re.findall(r"rollout_server: serving .* pid (\d+),", open(path).read())]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is in process group `pgid`."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()   # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_rl_run_survives_server_faults(tmp_path):
    workdir = str(tmp_path / "run")
    faults = tmp_path / "faults"
    # versions: the start-up sync is 1, step k's sync is k + 1
    faults.write_text("kill_in_update 4\nfail_load 5\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "longrl_jax.main", "--config=configs/demo.py:quick",
           f"--workdir={workdir}", "--config.stages=('rl',)", f"--config.rl.steps={RL_STEPS}",
           "--config.rl.prompts_per_step=4", "--config.rl.group_size=4",
           "--config.rl.minibatch_size=16", "--config.rl.max_response_tokens=16",
           "--config.rl.dynamic_sampling=False", "--config.rl.checkpoint_every=100"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", JAX_PLATFORMS="cpu",
               LONGRL_ROLLOUT_FAULTS=str(faults), XLA_FLAGS="")
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        # SIGKILL the serving process from outside once step 1 is recorded
        deadline = time.monotonic() + 1200
        while not _rl_rows(workdir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the server could be killed"
        [pid] = _server_pids(workdir)
        assert "rollout_server" in _cmdline(pid)
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=1500)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]

    rows = _rl_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, RL_STEPS + 1))   # every step, once
    # an undisturbed run serves version k + 1 after step k: so did this one
    assert [r["rollout/weight_version"] for r in rows] == [k + 1.0 for k in range(1, RL_STEPS + 1)]
    assert rows[-1]["rollout/server_restarts"] == 3
    # the two calls that failed were retried (a death noticed before a call is recovered
    # without a failed try)
    assert rows[-1]["rollout/retries"] >= 2
    # after each restart the samples came from the trainer's current weights
    assert max(r["rollout/logp_mismatch"] for r in rows) < 1e-3
    log = open(os.path.join(workdir, "rollout_server.log")).read()
    assert "fault drill: kill_in_update 4" in log and "fault drill: fail_load 5" in log
    assert "weight load failed after validation" in log and "exiting" in log
    assert len(_server_pids(workdir)) == 4       # the first server and three restarts
    assert faults.read_text().strip() == ""      # each drill fired once
    assert not any(_group_alive(pid) for pid in _server_pids(workdir))   # none left running


CHILD = textwrap.dedent("""
    import sys, time
    from longrl_jax.rl.connection import RolloutServerProcess
    server = RolloutServerProcess(sys.argv[1], env={env!r}, log_path=sys.argv[2],
                                  args=["--max-model-len", "256"]).start()
    print(server.process.pid, flush=True)
    time.sleep(3600)
""")


def test_sigkilled_trainer_leaves_no_server(tmp_path):
    """The trainer's process dies without cleaning up: its server (and vLLM's engine process
    in its process group) stops by itself."""
    path = write_served_qwen2(str(tmp_path / "qwen2"))
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(env=server_env()), path,
                              str(tmp_path / "server.log")], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(child.stdout.readline())
        assert "rollout_server" in _cmdline(pid)
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.5)
        if _group_alive(pid):
            os.killpg(pid, signal.SIGKILL)
            pytest.fail("the server outlived its SIGKILLed parent by 120 s")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    log = open(tmp_path / "server.log").read()
    assert f"parent {child.pid} is gone; stopping" in log and "rollout_server: stopped" in log


def test_bounded_attempts_then_a_clear_error(tmp_path):
    """A server that cannot come back: the connection tries `rollout.max_attempts` times in all
    (each a real `python -m rollout_server` that exits at start-up), then fails the call with a
    message that says what failed, how often, and the server's own last words."""
    import ml_collections

    from configs import common
    from longrl_jax.rl.connection import RolloutConnection, RolloutServerProcess
    from longrl_jax.rl.rollout_client import RolloutError

    config = ml_collections.ConfigDict(
        {"seed": 0, "rollout": common.rollout_config(max_attempts=3)})
    conn = RolloutConnection(config, str(tmp_path), str(tmp_path))
    conn.server = RolloutServerProcess(str(tmp_path / "gone"), env=server_env(),
                                       log_path=str(tmp_path / "server.log"))
    with pytest.raises(RolloutError) as err:
        conn.generate([], max_tokens=2)
    msg = str(err.value)
    assert "rollout failed 3 times" in msg and "not a directory" in msg, msg
    assert conn.counters() == {"rollout/server_restarts": 0.0, "rollout/retries": 2.0}
    assert open(tmp_path / "server.log").read().count("not a directory") == 3
