"""Tokens/s and MFU of the SFT step and the RL policy-update step, per preset and sequence length.

  python bench/train_step.py --quick --out /tmp/train_step.json           # tiny, T=256, < 2 min
  python bench/train_step.py --out bench/results/train_step.json     # small, qwen2_0_5b:4 layers
  python bench/train_step.py --preset qwen2_1_5b --seq_len 8192 --dtype bfloat16 \\
      --peak_tflops 989 --out h100.json                                    # H100: bf16 dense

Times the trainers' own jitted steps: `sft.trainer.make_step(mesh)` (next-token loss on the
response rows) and `rl.trainer.make_update_fn(mesh, rl_config)` (GRPO loss with KL to given
reference log-probs), on B sequences of T tokens each: a short text prompt, for a VLM preset the
video rows spliced in (the cached-embedding path, `trainable = "llm"`: the vision tower does not
run), and R response tokens. Median of `--repeats` after one compile-and-warm-up call.
At sp=1 the trainer runs dense attention (T x T logits) unless `model.attention="flash"`;
`--attention trainer flash` adds rows with that blockwise kernel for comparison. `NAME:LAYERS`
cuts a preset to fewer layers: the whole 0.5B model in float32 needs ~17 GB here (parameters,
gradients, Adam moments, and the new copies of parameters and moments the undonated jitted step
allocates).

FLOPs (model FLOPs, the usual MFU convention: what the model needs, not what the code executes;
rematerialisation and masked work are not counted). With L layers, width D, H query heads and
Hkv key/value heads of size dh, MLP width I, vocabulary V, T tokens per sequence of which R are
response rows:

  N      = L * (D*H*dh + 2*D*Hkv*dh + H*dh*D + 3*D*I)       matmul weights, no embedding/head
                                                            (biases, norms, RoPE not counted)
  fwd    = 2*N*T                                            the layers' matmuls
         + 2*L*T^2*H*dh                                     attention: QK^T and AV are each
                                                            2*T*T*H*dh per layer, halved for
                                                            the causal mask
         + 2*D*V*R                                          the LM head, which our code runs on
                                                            the R response rows only (all rows
                                                            of the [B, R] response block,
                                                            padding included), never on the
                                                            prompt or video rows
  step   = 3 * fwd * B                                      forward + backward (2x forward)
  MFU    = step / seconds / peak

(PaLM's formula does not halve causal attention; ours does, so our MFU is the lower of the two.)
`--peak_tflops` is the peak of the whole machine; without it the peak is measured in this run:
the best of a few jitted N x N matmuls (`--peak_matmul`, 2048) in the run's dtype on one device,
before and after the runs (the better of the two: on a shared machine a loaded moment halves it).
On CPU that makes the ratio meaningful (fake devices share the same cores, so the one-device
matmul is the host's peak); on a GPU pass the spec sheet's dense peak times the device count
(H100 SXM bf16 dense: 989 TFLOP/s).

Rows: {"step" ("sft" | "rl_update"), "preset", "seq_len", "batch", "response_len",
"seconds", "tokens_per_s", "tflops_per_step", "achieved_tflops", "mfu", ...}.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import (
    common,  # noqa: E402
    demo,  # noqa: E402
)
from longrl_jax import batch as batch_lib  # noqa: E402
from longrl_jax import prompts as prompts_lib
from longrl_jax.build import build_model  # noqa: E402
from longrl_jax.models.splice import SpliceLayout, splice_layout  # noqa: E402
from longrl_jax.optim import optimizer  # noqa: E402
from longrl_jax.rl.trainer import make_update_fn  # noqa: E402
from longrl_jax.sft.trainer import make_step  # noqa: E402

VIDEO_ID, SEP_ID = 5, 6
PROMPT_TEXT = 32                 # text tokens besides the video (VLM presets)
FORMULA = ("N = L*(D*H*dh + 2*D*Hkv*dh + H*dh*D + 3*D*I); fwd = 2*N*T + 2*L*T^2*H*dh "
           "(QK^T and AV each 2*T^2*H*dh per layer, halved for causal) + 2*D*V*R (LM head on "
           "the R response rows only); step = 3*fwd*B; MFU = step / seconds / peak")


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------

def matmul_params(llm) -> int:
    d, hd = llm.hidden_size, llm.head_dim
    per_layer = (d * llm.num_heads * hd + 2 * d * llm.num_kv_heads * hd + llm.num_heads * hd * d
                 + 3 * d * llm.intermediate_size)
    return llm.num_layers * per_layer


def forward_flops(llm, t: int, r: int) -> dict:
    n = matmul_params(llm)
    parts = {"matmul": 2 * n * t,
             "attention": 2 * llm.num_layers * t * t * llm.num_heads * llm.head_dim,
             "lm_head": 2 * llm.hidden_size * llm.vocab_size * r}
    return dict(parts, total=sum(parts.values()), params_matmul=n)


def measure_peak(n: int, dtype) -> float:
    """FLOP/s of the best of several jitted [n, n] @ [n, n] products on one device."""
    a = jax.device_put(jnp.ones((n, n), dtype) / n, jax.devices()[0])
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        jax.block_until_ready(f(a, a))
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


# ------------------------------------------------------------------------------------------------
# Model, batch, steps
# ------------------------------------------------------------------------------------------------

def make_config(args, preset: str):
    c = demo.get_config("quick")
    c.model.preset = preset
    c.model.vocab_size = args.vocab_size
    c.model.param_dtype = c.model.dtype = args.dtype
    c.model.remat = args.remat
    c.model.scan_layers = args.scan_layers
    c.mesh = common.mesh_config(fsdp=-1, sequence=args.sp)
    c.sp = common.sp_config(strategy=args.strategy, layout=args.layout)
    c.rl = common.rl_config(steps=1, prompts_per_step=args.batch, group_size=2, lr=1e-6,
                            max_response_tokens=args.response_len)
    c.sft = common.sft_config(steps=1, batch_size=args.batch, lr=1e-6,
                              max_response_tokens=args.response_len)
    return c


def make_batch(cfg, t: int, b: int, r: int, seed: int = 0, length_multiple: int = 64):
    """B sequences of exactly T tokens: prompt (+ video rows for a VLM) + R response tokens."""
    rng = np.random.default_rng(seed)
    vocab, d = cfg.llm.vocab_size, cfg.llm.hidden_size
    if t - r < PROMPT_TEXT:
        raise SystemExit(f"--seq_len {t} leaves no room for a prompt next to {r} response rows")
    prompts, frames = [], 0
    for i in range(b):
        if cfg.is_vlm:
            per_frame = cfg.tokens_per_frame + 1
            frames = (t - r - PROMPT_TEXT) // per_frame
            n_text = t - r - frames * per_frame + 1      # + the placeholder the video replaces
            ids = rng.integers(16, vocab, n_text).astype(np.int32)
            ids[n_text // 2] = VIDEO_ID
            layout = splice_layout(ids, video_token_id=VIDEO_ID, frames_per_video=[frames],
                                   tokens_per_frame=cfg.tokens_per_frame, separator_id=SEP_ID)
            video = rng.standard_normal((frames * cfg.tokens_per_frame, d)).astype(np.float32)
        else:
            ids = rng.integers(16, vocab, t - r).astype(np.int32)
            layout = SpliceLayout(ids, np.full(len(ids), -1, np.int32))
            video = np.zeros((0, d), np.float32)
        prompts.append(prompts_lib.Prompt(None, ids, layout, f"video{i}", video))
    responses = [rng.integers(16, vocab, r).astype(np.int32) for _ in range(b)]
    batch = batch_lib.build_batch(prompts, responses, response_len=r,
                                  length_multiple=length_multiple)
    if batch.token_ids.shape != (b, t):
        raise SystemExit(f"--seq_len {t} is not a multiple of {length_multiple} (the layout's)")
    return batch, frames


def timed(fn, repeats: int) -> tuple[float, float, list[float]]:
    start = time.perf_counter()
    jax.block_until_ready(fn())                           # compile + warm up
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), compile_s, times


def build(config, layers: int | None):
    """`build_model` for the config's preset; with `layers`, the same steps (parameters created
    in their shards, SP attention on a 'sequence' mesh axis) for the preset cut to that many
    layers (a 0.5B-wide model that fits this machine's memory)."""
    adjust = (lambda cfg:
              cfg.replace(llm=dataclasses.replace(cfg.llm, num_layers=layers))) if layers else None
    return build_model(config, video_token_id=VIDEO_ID, separator_token_id=SEP_ID,
                       adjust=adjust)


def bench_preset(args, spec: str, attention: str, peak: float) -> list[dict]:
    preset, _, layers = spec.partition(":")
    config = make_config(args, preset)
    config.model.attention = "flash" if attention == "flash" else "dense"
    model, mesh = build(config, int(layers) if layers else None)
    cfg = model.cfg
    opt = optimizer(model, config.sft.optimizer, "llm")
    sft_step = make_step(mesh)
    update = make_update_fn(mesh, config.rl)
    attention = (f"{args.strategy} (sp={args.sp})" if mesh.shape["sequence"] > 1 else
                 "flash" if attention == "flash" else "dense")
    rows = []
    for t in args.seq_len:
        layout = config.sp.layout
        batch, frames = make_batch(cfg, t, args.batch, args.response_len,
                                   length_multiple=batch_lib.length_multiple(mesh, layout))
        batch = batch_lib.in_layout(batch, mesh, layout)
        table = batch_lib.place_table(batch.video_table, mesh)
        shape = batch.targets.shape
        rng = np.random.default_rng(1)
        micro = batch_lib.place_micro_batches(batch.row_arrays(), 1, mesh)
        micro_rl = batch_lib.place_micro_batches(dict(
            batch.row_arrays(), adv=rng.standard_normal(shape).astype(np.float32),
            old_logp=-rng.random(shape).astype(np.float32),
            ref_logp=-rng.random(shape).astype(np.float32)), 1, mesh)
        fl = forward_flops(cfg.llm, t, args.response_len)
        step_flops = 3 * fl["total"] * args.batch
        steps = {"sft": functools.partial(sft_step, model, opt, micro, {"video_table": table}),
                 "rl_update": functools.partial(update, model, opt, micro_rl, table)}
        for name in args.steps:
            sec, compile_s, times = timed(steps[name], args.repeats)
            row = {"step": name, "preset": spec, "layers": cfg.llm.num_layers,
                   "attention": attention, "seq_len": t, "batch": args.batch,
                   "response_len": args.response_len, "frames": frames,
                   "devices": jax.device_count(), "sp": args.sp, "dtype": args.dtype,
                   "seconds": round(sec, 4), "tokens_per_s": round(args.batch * t / sec, 1),
                   "tflops_per_step": step_flops / 1e12,
                   "achieved_tflops": step_flops / sec / 1e12,
                   "mfu": step_flops / sec / peak,
                   "flops_fwd_per_seq": {k: v for k, v in fl.items()},
                   "compile_s": round(compile_s, 2), "all_s": [round(x, 4) for x in times]}
            rows.append(row)
            print(f"{spec:>12} {attention:>6} {name:>9} {t:>6} {args.batch:>3} {sec:>8.3f} "
                  f"{row['tokens_per_s']:>9.0f} {row['achieved_tflops'] * 1e3:>9.1f} "
                  f"{row['mfu'] * 100:>6.1f}% {fl['attention'] / fl['total'] * 100:>5.1f}% "
                  f"{compile_s:>7.1f}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset, T=256")
    ap.add_argument("--out", default=None)
    ap.add_argument("--preset", nargs="+", default=None,
                    help="ModelConfig presets, NAME or NAME:LAYERS (the preset cut to that many "
                         "layers); default: small qwen2_0_5b:4; tiny with --quick")
    ap.add_argument("--attention", nargs="+", default=["trainer"], choices=["trainer", "flash"],
                    help="at sp=1: the trainer's (dense, T^2 logits), and/or blockwise flash")
    ap.add_argument("--vocab_size", type=int, default=1024, help="for the tiny/small presets")
    ap.add_argument("--seq_len", type=int, nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (all devices)")
    ap.add_argument("--response_len", type=int, default=128)
    ap.add_argument("--steps", nargs="+", default=["sft", "rl_update"],
                    choices=["sft", "rl_update"])
    ap.add_argument("--sp", type=int, default=1, help="sequence axis (the rest is fsdp)")
    ap.add_argument("--strategy", default="ring", choices=["ring", "ulysses", "all_gather_kv"])
    ap.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"],
                    help="sequence layout with --sp > 1 (config.sp.layout)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--scan_layers", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak_tflops", type=float, default=None,
                    help="machine peak in TFLOP/s (default: measured with a matmul)")
    ap.add_argument("--peak_matmul", type=int, default=2048, help="N of the peak matmul")
    args = ap.parse_args()
    presets = args.preset or (["tiny"] if args.quick else ["small", "qwen2_0_5b:4"])
    args.seq_len = args.seq_len or ([256] if args.quick else [512, 2048])

    dev = jax.devices()[0]
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "--peak_tflops"
    else:
        peak = measure_peak(args.peak_matmul, getattr(jnp, args.dtype))
        source = (f"measured: best of 7 jitted {args.peak_matmul}x{args.peak_matmul} "
                  f"{args.dtype} matmuls on one {dev.platform} device")
    print(f"peak {peak / 1e9:.1f} GFLOP/s ({source})")
    print(f"{'preset':>12} {'attn':>6} {'step':>9} {'T':>6} {'B':>3} {'s/step':>8} {'tokens/s':>9} "
          f"{'GFLOP/s':>9} {'MFU':>7} {'attn%':>6} {'compile':>7}")
    rows = []
    for preset in presets:
        for attention in args.attention:
            rows += bench_preset(args, preset, attention, peak)
    if not args.peak_tflops:  # again after the runs: the best of both is nearer the hardware's
        after = measure_peak(args.peak_matmul, getattr(jnp, args.dtype))
        print(f"peak after the runs {after / 1e9:.1f} GFLOP/s")
        source += f"; best of before ({peak / 1e9:.1f} GFLOP/s) and after ({after / 1e9:.1f})"
        if after > peak:
            peak = after
            for r in rows:
                r["mfu"] = r["achieved_tflops"] * 1e12 / peak
            print(f"MFU against {peak / 1e9:.1f} GFLOP/s: " + ", ".join(
                f"{r['preset']} {r['step']} T={r['seq_len']} {r['attention']}: "
                f"{r['mfu'] * 100:.1f}%" for r in rows))
    meta = {"date": datetime.date.today().isoformat(), "platform": dev.platform,
            "device_kind": dev.device_kind, "devices": jax.device_count(),
            "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "peak_tflops": peak / 1e12, "peak_source": source,
            "formula": FORMULA, "attention_convention": "causal-halved",
            "note": ("CPU: MFU is against this host's measured matmul peak"
                     if dev.platform == "cpu" else "")}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
