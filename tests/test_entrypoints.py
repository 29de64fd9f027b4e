"""The absl entry point and the benchmark scripts, run as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=600, devices=8):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_main_runs_the_demo_config_with_sequence_parallelism(tmp_path):
    r = _run(["-m", "longrl_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
              "--config.mesh.sequence=4", "--config.mesh.fsdp=2",
              "--config.model.scan_layers=True", "--config.model.remat=True"])
    assert r.returncode == 0, r.stderr[-3000:]
    smoke = json.load(open(tmp_path / "smoke.json"))
    assert smoke["sequence_parallel"] == 4 and smoke["finite"]
    assert smoke["logits_shape"] == [1, smoke["sequence_length"], 512]


def test_main_names_a_bad_config_field(tmp_path):
    r = _run(["-m", "longrl_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
              "--config.mesh.sequence=4", "--config.mesh.fsdp=2", "--config.sp.strategy=bogus"])
    assert r.returncode != 0
    assert "unknown SP strategy 'bogus'" in r.stderr and "Traceback" not in r.stderr


def test_sp_attention_bench_writes_its_table(tmp_path):
    out = tmp_path / "spa.json"
    r = _run(["bench/sp_attention.py", "--seq_len=256", "--heads=8", "--kv_heads=2",
              "--head_dim=16", "--block=64", "--repeats=1", f"--out={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(out))
    assert {row["strategy"] for row in data["rows"]} == {"dense", "flash", "all_gather_kv",
                                                         "ulysses", "ring"}
    assert data["meta"]["meaningful"] is False and "not meaningful" in r.stdout


@pytest.mark.slow
def test_sp_memory_quick_meets_the_bar(tmp_path):
    out = tmp_path / "spm.json"
    r = _run(["bench/sp_memory.py", "--quick", f"--out={out}"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.load(open(out))
    assert {"sp", "frames", "tokens", "temp_bytes", "argument_bytes"} <= set(rows[0])
    big = max(r["frames"] for r in rows)
    temp = {r["sp"]: r["temp_bytes"] for r in rows
            if r["frames"] == big and r["layers"] == max(x["layers"] for x in rows)}
    assert temp[1] / temp[8] >= 6
