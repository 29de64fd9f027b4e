"""Per-device memory of a policy forward+backward over a long spliced video, vs the SP degree.

Compiles (never runs) one policy-gradient step of a 7B-shaped LLM (LongVILA-R1-7B widths: D 3584,
28 q / 4 kv heads, MLP 18944, vocab 151651; bf16; remat per layer) on 8 fake CPU devices through
the trainers' own log-prob path: a placed `batch.SequenceBatch` (`place_batch`'s shardings, T in
the `--layout` order, zig-zag by default as in the configs), the video's rows spliced on the
device (`VLM.splice`) and log-probs taken at the response only (`logprobs.batch_logprobs`). It
reads XLA's memory analysis of the compiled program for sp in {1, 2, 4, 8} (the rest of the 8
devices form the fsdp axis; parameters are ZeRO-sharded over fsdp x sequence in every case). The
video table is float32 and replicated, as the trainers place it: it counts in argument_bytes.

  python bench/sp_memory.py --quick --out /tmp/sp_memory.json     # < 3 minutes, 1-2k frames
  python bench/sp_memory.py --out bench/sp_memory.json             # more frames and layers

Rows: {"sp", "frames", "tokens", "layers", "strategy", "layout", "temp_bytes", "argument_bytes",
"output_bytes", "compile_s"}. The summary fits temp = a + b*layers + c*tokens + d*layers*tokens
per sp and reports, for the full 28-layer model, the largest frame count that fits 80 GB per
device with bf16 params, fp32 Adam states, a bf16 gradient and an fp32 master copy,
ZeRO-sharded over 8.
Absolute numbers are those of XLA's CPU buffer assignment; ratios between sp values are the
point.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from longrl_jax import batch as batch_lib  # noqa: E402
from longrl_jax.models import VLM, ModelConfig, flash  # noqa: E402
from longrl_jax.parallel import logprobs  # noqa: E402
from longrl_jax.parallel import mesh as mesh_lib  # noqa: E402
from longrl_jax.parallel import sequence as S  # noqa: E402

TOKENS_PER_FRAME = 257  # 256 projector tokens + the "\n" separator
PROMPT, RESPONSE = 128, 512
GB = 1e9
DTYPE = jnp.bfloat16


def tokens_for(frames: int) -> int:
    return PROMPT + frames * TOKENS_PER_FRAME + RESPONSE


def compile_step(sp: int, frames: int, layers: int, strategy: str, layout: str) -> dict:
    mesh = mesh_lib.make_mesh({"fsdp": -1, "sequence": sp})
    llm_cfg = dataclasses.replace(ModelConfig.longvila_r1_7b().llm, num_layers=layers)
    # The LLM half of the VLM: stage 1 runs before the step, its rows come in the video table.
    abstract = nnx.eval_shape(lambda: VLM(ModelConfig(llm=llm_cfg), rngs=nnx.Rngs(0),
                                          dtype=DTYPE, param_dtype=DTYPE, remat=True,
                                          scan_layers=True))
    if sp > 1:
        S.use_sequence_parallel(abstract.llm, mesh, strategy, layout=layout, block_q=1024,
                                block_k=1024)
    else:  # the best single-device attention: the same blockwise kernel, no T^2 logits
        abstract.llm.set_attention(flash.attention_fn(block_q=1024, block_k=1024))
    graphdef, state = nnx.split(abstract)
    shardings = mesh_lib.state_shardings(state, mesh)
    state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state,
                         shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))

    # The trainers' batch (`batch.build_batch` + `place_batch`): one sequence of prompt, video
    # rows and response, T a multiple of the layout's split, the video table replicated.
    t = tokens_for(frames)
    multiple = batch_lib.length_multiple(mesh, layout)
    tp = -(-t // multiple) * multiple
    shapes = {"token_ids": ((1, tp), jnp.int32), "video_rows": ((1, tp), jnp.int32),
              "video_table": ((frames * (TOKENS_PER_FRAME - 1), llm_cfg.hidden_size),
                              jnp.float32),
              "positions": ((1, tp), jnp.int32), "valid": ((1, tp), jnp.bool_),
              "rows": ((1, RESPONSE), jnp.int32), "targets": ((1, RESPONSE), jnp.int32),
              "mask": ((1, RESPONSE), jnp.float32)}
    where = batch_lib.batch_shardings(mesh, 1)
    placed = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=where[k])
              for k, (shape, dtype) in shapes.items()}
    adv = jax.ShapeDtypeStruct((1, RESPONSE), jnp.float32)

    def step(state, b, adv):
        def loss_fn(state):
            logp, _ = logprobs.batch_logprobs(nnx.merge(graphdef, state), b, mesh=mesh)
            return -jnp.mean(logp * adv)
        return jax.value_and_grad(loss_fn)(state)

    start = time.time()
    compiled = jax.jit(step, out_shardings=(None, shardings)).lower(state, placed, adv).compile()
    mem = compiled.memory_analysis()
    return {"sp": sp, "frames": frames, "tokens": t, "layers": layers, "strategy": strategy,
            "layout": batch_lib.sequence_layout(mesh, layout),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "compile_s": round(time.time() - start, 1)}


def fit_frames(rows: list[dict], sp: int, budget: float = 80 * GB, layers: int = 28) -> dict:
    """Fits temp bytes per sp, extrapolates to `layers`, and finds the largest frame count that
    fits `budget` next to the ZeRO-sharded training state of the full 7B model."""
    rs = [r for r in rows if r["sp"] == sp]
    x = np.array([[1, r["layers"], r["tokens"], r["layers"] * r["tokens"]] for r in rs], float)
    y = np.array([r["temp_bytes"] for r in rs], float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    cfg = ModelConfig.longvila_r1_7b().llm
    n_params = (cfg.vocab_size * cfg.hidden_size * 2 + cfg.num_layers * (
        cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        + cfg.num_heads * cfg.head_dim * cfg.hidden_size + 3 * cfg.hidden_size
        * cfg.intermediate_size))
    state = n_params * (2 + 2 + 4 + 8) / 8  # bf16 param + bf16 grad + fp32 master + Adam, /8
    per_token = coef[2] + coef[3] * layers
    fixed = coef[0] + coef[1] * layers
    max_tokens = (budget - state - fixed) / per_token if per_token > 0 else float("inf")
    frames = int((max_tokens - PROMPT - RESPONSE) // TOKENS_PER_FRAME)
    return {"sp": sp, "state_gb_per_device": round(state / GB, 1),
            "activation_bytes_per_token": round(per_token), "max_frames_80gb": max(frames, 0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames and layers (< 3 min)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--strategy", default="ring", choices=S.STRATEGIES)
    ap.add_argument("--layout", default="zigzag", choices=S.LAYOUTS,
                    help="sequence layout with sp > 1 (the trainers' config.sp.layout)")
    args = ap.parse_args()
    assert jax.device_count() == 8, "needs 8 (fake) devices"
    if args.quick:
        grid = [(2, 1024), (4, 1024), (2, 2048), (4, 2048)]
    else:
        grid = [(2, 256), (4, 256), (2, 512), (4, 512), (8, 512), (2, 1024), (4, 1024),
                (2, 2048)]
    rows = []
    print(f"{'sp':>3} {'frames':>6} {'tokens':>7} {'layers':>6} {'temp GB':>9} {'args GB':>8} "
          f"{'compile s':>9}")
    for sp in (1, 2, 4, 8):
        for layers, frames in grid:
            r = compile_step(sp, frames, layers, args.strategy, args.layout)
            rows.append(r)
            print(f"{sp:>3} {frames:>6} {r['tokens']:>7} {layers:>6} {r['temp_bytes'] / GB:>9.2f} "
                  f"{r['argument_bytes'] / GB:>8.2f} {r['compile_s']:>9.1f}", flush=True)
    big = max(f for _, f in grid)
    lay = max(l for l, f in grid if f == big)
    temp = {r["sp"]: r["temp_bytes"] for r in rows if r["frames"] == big and r["layers"] == lay}
    print(f"\ntemp memory ratio sp=1 / sp=8 at {big} frames, {lay} layers: "
          f"{temp[1] / temp[8]:.2f}x (sp=2: {temp[1] / temp[2]:.2f}x, sp=4: "
          f"{temp[1] / temp[4]:.2f}x)")
    fits = [fit_frames(rows, sp) for sp in (1, 2, 4, 8)]
    print("\n7B-shaped (28 layers), 80 GB per device, 8 devices:")
    for f in fits:
        print(f"  sp={f['sp']}: ~{f['max_frames_80gb']} frames "
              f"(state {f['state_gb_per_device']} GB/device, "
              f"{f['activation_bytes_per_token'] / 1e3:.1f} KB activation per token)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
        with open(os.path.splitext(args.out)[0] + "_summary.json", "w") as fh:
            json.dump({"ratio_sp1_over_sp8": temp[1] / temp[8], "frames": big, "layers": lay,
                       "fit_80gb": fits, "strategy": args.strategy, "layout": args.layout},
                      fh, indent=1)


if __name__ == "__main__":
    main()
