"""The main job end to end: CoT-SFT, GRPO with a real rollout server, checkpoints, export.

One training run goes uninterrupted; a second, identical one is SIGKILLed in the middle of an RL
step, restarted on the same workdir, and must finish with bit-identical parameters. The RL task
is trivially learnable (every RL question's answer is "A"), so the reward must rise.

Both runs take the 7B recipe's code path at toy size (configs/longvila_r1_7b_grpo.py): 8 host
devices as fsdp 2 x sequence 4, ring attention in the zig-zag layout, scanned remat layers,
bfloat16 parameters, micro-batched log-prob passes and updates, and a low-variance KL to the
frozen reference in the loss. Unlike the recipe it computes in float32, so the rollout server's
float32 copy of the same bf16 weights scores the samples as the trainer does and the log-prob
mismatch check stays tight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from longrl_jax.data import synthetic

RL_STEPS = 16
DEVICES, SEQUENCE = 8, 4


def _write_data(root: str) -> None:
    synthetic.generate(root, num_train=48, num_eval=8, num_frames=48, size=32, tokenizer=True,
                       sample_frames=16)
    rows = [json.loads(l) for l in open(os.path.join(root, "train.jsonl"))]
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for i, row in enumerate(rows):
            row["reasoning"] = "the video shows it"
            if i >= 16:  # the RL rows (the first 16 are the SFT rows, letters A-D)
                row["answer"] = "A"
            f.write(json.dumps(row) + "\n")


def _cmd(data: str, workdir: str) -> list[str]:
    overrides = {
        "dataset.kind": "jsonl", "dataset.train": f"{data}/train.jsonl",
        "dataset.eval": f"{data}/eval.jsonl", "dataset.video_dir": f"{data}/videos",
        "dataset.tokenizer": f"{data}/tokenizer",
        "sft.steps": 60, "sft.batch_size": 8, "sft.num_examples": 16, "sft.optimizer.lr": 5e-3,
        "sft.max_response_tokens": 16, "sft.checkpoint_every": 20,
        "rl.steps": RL_STEPS, "rl.prompts_per_step": 8, "rl.group_size": 8,
        "rl.minibatch_size": 32, "rl.max_response_tokens": 16, "rl.eval_every": 0,
        "rl.checkpoint_every": 1, "rl.optimizer.lr": 1e-3,
        "eval.num_examples": 8, "eval.max_tokens": 16,
        # pinned where the demo config differs, so this test keeps its own calibrated task
        "model.init_std": 0.02, "sft.num_frames": 0, "rl.dynamic_sampling": False,
        "data.num_frames": 16,
        # the 7B code path at toy size
        "mesh.sequence": SEQUENCE, "mesh.fsdp": -1, "sp.strategy": "ring", "sp.layout": "zigzag",
        "model.scan_layers": True, "model.remat": True, "model.param_dtype": "bfloat16",
        "model.dtype": "float32", "rl.micro_batch_size": 2, "rl.logprob_micro_batch_size": 4,
        "rl.kl_coef": 0.01, "rl.kl_type": "low_var_kl", "rl.kl_in": "loss",
    }
    return [sys.executable, "-m", "longrl_jax.main", "--config=configs/demo.py:quick",
            f"--workdir={workdir}", "--config.stages=('sft','rl','export')",
            *[f"--config.{k}={v}" for k, v in overrides.items()]]


def _env():
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")


def _rl_steps(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    from longrl_jax.metrics import read_metrics
    return [r for r in read_metrics(path) if r["stage"] == "rl"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = str(root / "data")
    _write_data(data)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    a, b = str(root / "a"), str(root / "b")
    done = subprocess.run(_cmd(data, a), cwd=repo, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    # the same run, SIGKILLed during an RL step (after step 4's metrics, before step 6's)
    proc = subprocess.Popen(_cmd(data, b), cwd=repo, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while time.time() < deadline and len(_rl_steps(b)) < 4 and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(_rl_steps(b))
    assert killed_at < RL_STEPS
    resumed = subprocess.run(_cmd(data, b), cwd=repo, env=_env(), capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return a, b, killed_at


def test_reward_rises_on_a_learnable_task(runs):
    a, _, _ = runs
    rewards = [r["reward/mean"] for r in _rl_steps(a)]
    assert len(rewards) == RL_STEPS
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert last > first + 0.15, rewards
    mismatch = max(r["rollout/logp_mismatch"] for r in _rl_steps(a))
    assert mismatch < 1e-3  # rollout and trainer score the same sequence with the same weights


def test_both_runs_take_the_7b_code_path(runs):
    """What the overrides ask for is what ran: the mesh, the stored parameters, KL in the loss."""
    import jax
    import orbax.checkpoint as ocp
    for workdir in runs[:2]:
        log = open(os.path.join(workdir, "run.log")).read()
        assert f"mesh {{'data': 1, 'fsdp': {DEVICES // SEQUENCE}, 'sequence': {SEQUENCE}, " \
            "'tensor': 1}" in log
        meta = json.load(open(os.path.join(workdir, "params", "rl", "model_config.json")))
        assert meta["scan_layers"] is True
        stored = ocp.StandardCheckpointer().metadata(f"{workdir}/params/rl/params").item_metadata
        assert {str(leaf.dtype) for leaf in jax.tree.leaves(stored)} == {"bfloat16"}
        assert all(r["actor/kl"] > 0 for r in _rl_steps(workdir)[1:])


def test_killed_run_resumes_to_identical_parameters(runs):
    a, b, killed_at = runs
    from flax import nnx

    from longrl_jax import checkpoint
    pa = nnx.to_pure_dict(nnx.state(checkpoint.load_params(f"{a}/params/rl"), nnx.Param))
    pb = nnx.to_pure_dict(nnx.state(checkpoint.load_params(f"{b}/params/rl"), nnx.Param))
    import jax
    la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(la) == len(lb) and len(la) > 10
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # and the RL metrics of the steps after the kill are those of the uninterrupted run
    ra = {r["step"]: r["reward/mean"] for r in _rl_steps(a)}
    rb = {r["step"]: r["reward/mean"] for r in _rl_steps(b)}
    assert all(ra[s] == rb[s] for s in range(killed_at + 1, RL_STEPS + 1))


def test_export_loads_in_transformers(runs, tmp_path):
    _, b, _ = runs
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from longrl_jax import checkpoint
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "exported")
    r = subprocess.run([sys.executable, "tools/export_hf.py", f"--workdir={b}", f"--out={out}"],
                       cwd=repo, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for d in (out, f"{b}/export"):
        hf = Qwen2ForCausalLM.from_pretrained(f"{d}/llm", dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(f"{d}/llm")
        ids = tok.encode("Which appeared first in the video", add_special_tokens=False)
        assert len(ids) == 6, ids  # the run's tokenizer travelled with the export
        model = checkpoint.load_params(f"{b}/params/rl")
        ref = np.asarray(model.llm(np.asarray([ids])))
        with torch.no_grad():
            got = hf(torch.tensor([ids])).logits.numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
