"""bench/rl_step.py and bench/train_step.py at their smallest settings: they run and write
the JSON their RESULTS.md tables are made from."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, devices, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_rl_step_bench_runs_the_three_modes(tmp_path):
    out = tmp_path / "rl_step.json"
    r = _run(["bench/rl_step.py", "--quick", "--frames=4", "--repeats=1", "--group_size=2",
              "--response_len=16", "--sp=2", f"--out={out}"], devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(out))
    rows = data["rows"]
    assert {"mode", "frames", "tokens", "seconds", "devices", "preset"} <= set(rows[0])
    assert {row["mode"] for row in rows} == {"none", "stage1", "stage1+2"}
    assert all(row["seconds"] > 0 and row["finite"] and row["devices"] == 2 for row in rows)
    assert {row["sp"] for row in rows} == {1, 2}
    assert {"none/stage1", "none/stage1+2", "none/stage1+2 (best)"} <= set(data["ratios"])
    assert "rollout" in data["meta"] and "none/stage1+2" in r.stdout


def test_train_step_bench_reports_mfu(tmp_path):
    out = tmp_path / "train_step.json"
    r = _run(["bench/train_step.py", "--quick", "--seq_len=192", "--response_len=32",
              "--repeats=1", "--peak_matmul=512", f"--out={out}"], devices=1)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(out))
    assert {row["step"] for row in data["rows"]} == {"sft", "rl_update"}
    row = data["rows"][0]
    assert {"preset", "seq_len", "batch", "seconds", "tokens_per_s", "tflops_per_step",
            "achieved_tflops", "mfu"} <= set(row)
    assert 0 < row["mfu"] < 1 and row["tokens_per_s"] > 0
    # The formula in the JSON: fwd = 2*N*T + 2*L*T^2*H*dh + 2*D*V*R, tiny preset, vocab 1024.
    f = row["flops_fwd_per_seq"]
    n = 2 * (64 * 2 * 32 + 2 * 64 * 1 * 32 + 2 * 32 * 64 + 3 * 64 * 128)
    assert f["params_matmul"] == n
    assert f["total"] == 2 * n * 192 + 2 * 2 * 192 ** 2 * 2 * 32 + 2 * 64 * 1024 * 32
    assert "formula" in data["meta"] and data["meta"]["peak_tflops"] > 0
