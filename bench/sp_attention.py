"""Times the SP attention strategies against dense and blockwise attention on the devices here.

  python bench/sp_attention.py --out /tmp/sp_attention.json            # CPU: 8 fake devices
  python bench/sp_attention.py --seq_len 65536 --out bench/gpu.json     # a GPU/TPU machine

Forward and forward+backward, median of `--repeats` runs after one compile-and-warm-up run,
for: dense (T^2 logits, one device), flash (blockwise, one device), and all_gather_kv / ulysses /
ring on a 'sequence' axis over all devices. On CPU the fake devices share two cores, so the
times say nothing about a real mesh (communication is a memcpy and the "devices" run one after
another): the table is printed with that warning, and the numbers are kept only as a record.
"""

from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") and \
        os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from longrl_jax.models.flash import flash_attention  # noqa: E402
from longrl_jax.models.layers import dense_attention  # noqa: E402
from longrl_jax.parallel import mesh as mesh_lib  # noqa: E402
from longrl_jax.parallel import sequence as S  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip_dense", action="store_true", help="skip the T^2 reference")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dtype = getattr(jnp, args.dtype)
    sp = jax.device_count()
    mesh = mesh_lib.make_mesh({"sequence": sp})
    b, t, hq, hk, d = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
    key = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(key[0], (b, t, hq, d), dtype)
    k = jax.random.normal(key[1], (b, t, hk, d), dtype)
    v = jax.random.normal(key[2], (b, t, hk, d), dtype)
    platform = jax.devices()[0].platform
    device = jax.devices()[0].device_kind

    def fwd_bwd(attn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)),
                                (0, 1, 2)))

    rows = []
    singles = {"flash": lambda q, k, v: flash_attention(q, k, v, block_q=args.block,
                                                        block_k=args.block)}
    if not args.skip_dense:
        singles["dense"] = lambda q, k, v: dense_attention(q, k, v, causal=True)
    for name, attn in singles.items():
        one = jax.devices()[0]
        qd, kd, vd = (jax.device_put(x, one) for x in (q, k, v))
        rows.append({"strategy": name, "sp": 1,
                     "fwd_s": timed(jax.jit(attn), qd, kd, vd, repeats=args.repeats),
                     "fwd_bwd_s": timed(fwd_bwd(attn), qd, kd, vd, repeats=args.repeats)})
        print(rows[-1], flush=True)
    for strategy in S.STRATEGIES:
        layout = "zigzag" if strategy == "ring" else "contiguous"
        seq = S.pad_and_shard(q, k, v, mesh=mesh, layout=layout)

        def attn(q, k, v, strategy=strategy, layout=layout):
            return S.attention(q, k, v, mesh=mesh, strategy=strategy, layout=layout,
                               block_q=args.block, block_k=args.block)
        rows.append({"strategy": strategy, "sp": sp,
                     "fwd_s": timed(jax.jit(attn), *seq.arrays, repeats=args.repeats),
                     "fwd_bwd_s": timed(fwd_bwd(attn), *seq.arrays, repeats=args.repeats)})
        print(rows[-1], flush=True)

    base = next(r for r in rows if r["strategy"] == "flash")
    print(f"\n{platform} ({device}), {sp} devices, B={b} T={t} heads {hq}/{hk} d={d} "
          f"{args.dtype}")
    if platform == "cpu":
        print("WARNING: fake CPU devices share 2 cores; these times are not meaningful for a "
              "real mesh.")
    print(f"{'strategy':>14} {'sp':>3} {'fwd ms':>9} {'fwd+bwd ms':>11} {'vs flash(1)':>11}")
    for r in rows:
        r["speedup_vs_flash_sp1"] = base["fwd_bwd_s"] / r["fwd_bwd_s"]
        print(f"{r['strategy']:>14} {r['sp']:>3} {r['fwd_s'] * 1e3:>9.1f} "
              f"{r['fwd_bwd_s'] * 1e3:>11.1f} {r['speedup_vs_flash_sp1']:>10.2f}x")
    if args.out:
        meta = {"date": datetime.date.today().isoformat(), "platform": platform,
                "device": device, "devices": sp, "batch": b, "seq_len": t, "heads": hq,
                "kv_heads": hk, "head_dim": d, "dtype": args.dtype,
                "meaningful": platform != "cpu"}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
