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


def test_main_trains_with_sequence_parallelism(tmp_path):
    """CoT-SFT of the quick demo with MR-SP (ring, zig-zag, sequence 4 x fsdp 2), scanned remat
    layers."""
    r = _run(["-m", "longrl_jax.main", "--config=configs/demo.py:quick", f"--workdir={tmp_path}",
              "--config.stages=('sft',)", "--config.mesh.sequence=4", "--config.mesh.fsdp=2",
              "--config.model.scan_layers=True", "--config.model.remat=True",
              "--config.sp.layout=zigzag", "--config.sft.steps=3"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    losses = [row["loss"] for row in rows if row["stage"] == "sft"]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert os.path.isdir(tmp_path / "params" / "sft" / "params")


@pytest.mark.parametrize("override, message", [
    ("--config.sp.strategy=bogus", "config.sp.strategy: unknown SP strategy 'bogus'"),
    ("--config.rl.group_size=1", "config.rl.group_size: GRPO needs at least 2"),
    ("--config.rl.loss_agg=mean", "config.rl.loss_agg: one of"),
    ("--config.sft.trainable=vision", "config.sft.trainable: one of"),
])
def test_main_names_a_bad_config_field_before_any_work(tmp_path, override, message):
    r = _run(["-m", "longrl_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
              "--config.mesh.sequence=4", "--config.mesh.fsdp=2", override], timeout=120)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "data")  # nothing was generated


def test_sp_attention_bench_writes_its_table(tmp_path):
    out = tmp_path / "spa.json"
    r = _run(["bench/sp_attention.py", "--seq_len=256", "--heads=8", "--kv_heads=2",
              "--head_dim=16", "--block=64", "--repeats=1", f"--out={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(out))
    assert {row["strategy"] for row in data["rows"]} == {"dense", "flash", "all_gather_kv",
                                                         "ulysses", "ring"}
    assert data["meta"]["meaningful"] is False and "not meaningful" in r.stdout
