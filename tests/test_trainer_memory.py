"""bench/trainer_memory.py: it compiles the trainers' own step functions (not copies), writes
per-device rows whose peak adds up, and the sequence axis shrinks the video table per device."""

import ast
import importlib.util
import inspect
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import demo
from longrl_jax import build
from longrl_jax.parallel import mesh as mesh_lib
from longrl_jax.rl import trainer as rl_trainer
from longrl_jax.sft import trainer as sft_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "trainer_memory.py")
FIELDS = {"stage", "frames", "tokens", "sequence", "devices", "micro_batch", "argument_bytes",
          "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes_per_device",
          "resident_bytes"}
# A small GRPO / SFT shape: 4 prompts x 2 samples, mini-batches of 8 in micro-batches of 1 per
# device, SFT batches of 8 in micro-batches of 1 per device.
SMALL = ["--config.rl.prompts_per_step=4", "--config.rl.group_size=2",
         "--config.rl.minibatch_size=8", "--config.rl.micro_batch_size=1",
         "--config.rl.logprob_micro_batch_size=1", "--config.rl.max_response_tokens=16",
         "--config.sft.batch_size=8", "--config.sft.micro_batch_size=1",
         "--config.sft.max_response_tokens=16"]


def _bench():
    if "trainer_memory_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("trainer_memory_bench", BENCH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod    # (its dataclass looks its module up there)
        spec.loader.exec_module(mod)
    return sys.modules["trainer_memory_bench"]


def _run(args, devices=8, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")   # the bench sets the count
    return subprocess.run([sys.executable, BENCH, *args, f"--devices={devices}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_the_bench_compiles_the_function_objects_the_trainers_make(monkeypatch):
    """Each step the bench compiles is the very object the trainers' factory returned; a step
    re-written in the bench (its own jit) would not be."""
    bench = _bench()
    made = {}

    def spy(module, name, stage):
        original = getattr(module, name)

        def factory(*args, **kw):
            made[stage] = original(*args, **kw)
            return made[stage]
        monkeypatch.setattr(module, name, factory)
    spy(rl_trainer, "make_update_fn", "rl_update")
    spy(rl_trainer, "make_logprob_fn", "rl_logprobs")
    spy(sft_trainer, "make_step", "sft_step")
    compiled = {}

    def fake_compile(fn, args):   # record what would be compiled; compile nothing
        compiled[len(compiled)] = fn
        return dict(argument_bytes=0, output_bytes=0, temp_bytes=0, alias_bytes=0), 0.0
    monkeypatch.setattr(bench, "compile_memory", fake_compile)
    rows = bench.measure(demo.get_config("quick"), frames=2, sequence=1,
                         devices=jax.device_count(), log=lambda *_: None)
    assert [r["stage"] for r in rows] == list(bench.STAGES)
    assert [compiled[i] for i in range(3)] == [made[s] for s in bench.STAGES]
    assert all(compiled[i] is made[s] for i, s in enumerate(bench.STAGES))
    # The trainers build their steps with those factories, and the bench has no jit of its own.
    assert "make_update_fn(ctx.mesh, c, ctx.rules)" in inspect.getsource(rl_trainer.train)
    assert "make_logprob_fn(ctx.mesh, ctx.rules)" in inspect.getsource(rl_trainer.train)
    assert "make_step(ctx.mesh, ctx.rules)" in inspect.getsource(sft_trainer.train)
    names = {n.attr if isinstance(n, ast.Attribute) else n.id
             for n in ast.walk(ast.parse(open(BENCH).read()))
             if isinstance(n, (ast.Attribute, ast.Name))}
    assert not names & {"jit", "pjit", "grad", "value_and_grad", "value_and_grad_accumulated",
                        "batch_logprobs", "policy_loss"}


def test_memory_analysis_is_per_device():
    """What the bench's numbers mean: an 8-way sharded argument counts an eighth of a
    replicated one."""
    mesh = mesh_lib.make_mesh({"fsdp": -1})
    n = jax.device_count()

    def arg_bytes(spec):
        x = jax.ShapeDtypeStruct((n * 1024,), jnp.float32, sharding=NamedSharding(mesh, spec))
        return jax.jit(lambda a: a * 2).lower(x).compile().memory_analysis() \
            .argument_size_in_bytes
    assert arg_bytes(P()) == n * 1024 * 4
    assert arg_bytes(P("fsdp")) == 1024 * 4


def test_cli_writes_rows_whose_peak_adds_up(tmp_path):
    out = tmp_path / "tm.json"
    r = _run(["--config", "configs/demo.py:quick", "--frames", "16", "--sequence", "2",
              "--out", str(out), "--budget_gb", "80", *SMALL])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.load(open(out))
    assert len(rows) == 3 and {r["stage"] for r in rows} == {"rl_update", "rl_logprobs",
                                                              "sft_step"}
    for row in rows:
        assert FIELDS <= set(row)
        assert row["devices"] == 8 and row["sequence"] == 2
        assert row["peak_bytes_per_device"] == (row["argument_bytes"] + row["output_bytes"]
                                                + row["temp_bytes"] - row["alias_bytes"]
                                                + row["resident_bytes"]
                                                - row["host_offload_bytes"])
        assert row["resident_bytes"] == sum(row["resident"].values())
        assert row["temp_bytes"] > 0 and row["argument_bytes"] > 0
        assert row["tokens"] % 64 == 0
    by = {(r["stage"], r["frames"]): r for r in rows}
    # micro-batches as the trainers make them: 8 sequences over a batch degree of 4 (fsdp 4)
    assert (by["rl_update", 16]["num_micro"], by["rl_update", 16]["micro_batch"]) == (2, 4)
    assert by["rl_logprobs", 16]["micro_batch"] == 4 and by["sft_step", 16]["num_micro"] == 2
    # the reference model is resident (kl_coef > 0) in both RL stages, the optimizer in the
    # log-prob pass; the update donates parameters and optimizer state (aliased outputs), the
    # log-prob step returns log-probs only (not a copy of the model)
    assert by["rl_update", 16]["resident"]["reference_params"] > 0
    assert by["rl_logprobs", 16]["resident"]["optimizer_state"] > 0
    assert by["rl_update", 16]["alias_bytes"] >= 0.9 * by["rl_update", 16]["output_bytes"]
    assert by["sft_step", 16]["alias_bytes"] >= 0.9 * by["sft_step", 16]["output_bytes"]
    assert by["rl_logprobs", 16]["output_bytes"] < 1e5
    assert by["rl_update", 16]["tokens"] == 192     # 64 + 16 * (4 + 1) + 16, rounded up to 64
    assert "sequence 2: largest measured frame count with every stage within 80 GB per " \
           "device: 16" in r.stdout


def test_sequence_axis_shrinks_the_video_table_per_device(tmp_path):
    """Sequence 1, 2, 4 on 8 devices: parameters (ZeRO over fsdp x sequence) and rows (all 8
    sequences in one log-prob call, rows over fsdp, T over sequence) take the same bytes per
    device; the [S, N_s, D] table takes 1/S of them."""
    out = tmp_path / "tm.json"
    small = [a for a in SMALL if "logprob_micro_batch_size" not in a]
    r = _run(["--config", "configs/demo.py:quick", "--frames", "256", "--sequence", "1", "2", "4",
              "--stages", "rl_logprobs", "--out", str(out),
              "--config.rl.logprob_micro_batch_size=0", *small])
    bench = _bench()
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["sequence"]: row for row in json.load(open(out))}
    args = {s: rows[s]["argument_bytes"] for s in (1, 2, 4)}
    assert args[1] > args[2] > args[4]
    cfg = build.model_config(demo.get_config("quick"))
    table = {s: bench.device_bytes(bench.table_struct(
        mesh_lib.make_mesh({"fsdp": -1, "sequence": s}), rows[1]["videos"],
        256 * cfg.tokens_per_frame, cfg.llm.hidden_size, np.float32)) for s in (1, 2, 4)}
    assert table[1] == 2 * table[2] == 4 * table[4]
    for s in (2, 4):
        assert abs((args[1] - args[s]) - (table[1] - table[s])) <= 0.01 * table[1]
