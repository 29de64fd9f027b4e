"""Video decoding throughput: our loader vs raw decord, the device-side resize, its difference
from the PIL pipeline, and decoding overlapped with compute.

  python bench/video_decode.py --out bench/results/video_decode_cpu.json

A 2-minute 30 fps H.264 video (3,600 frames, `--size` px, generated once into --workdir) is
sampled uniformly at 64 and 512 frames:
  raw       decord `get_batch` of the sampled indices at native size (no resize, no normalise)
  loader    `data.frames.decode_frames`, what the embedder uses: open, batched decode, uint8 at
            native size (resize + normalise run in stage 1 on the device)
  host_pil  `data.frames.load_frames`: the same decode plus PIL's bicubic resize to 448 and the
            SigLIP normalisation on the host (the loader before issue 17)
  preprocess `models.siglip.FramePreprocess(448)` jitted on this machine's JAX device (here the
            CPU; on an accelerator host it runs on the accelerator), uint8 in, float32 out;
            `loader_then_preprocess_fps` is the two one after the other (a CPU-only host)
Difference from the PIL pipeline: the device resize (Pillow's integer arithmetic) and
`jax.image.resize(..., "bicubic")` against PIL, per pixel (uint8 levels) and on the embeddings of
a tiny SigLIP tower + projector at 32 px (ModelConfig.tiny) and at 448 px (same widths).
Then `--videos` loads of 64 frames each are followed by a jitted compute step of about the same
duration, once one after the other and once with `FramePrefetcher` decoding the next video in a
background thread; the ratio says how much of the decoding the overlap hides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from longrl_jax.data import frames as V  # noqa: E402


def make_video(path: str, seconds: int, fps: int, size: int) -> None:
    n = seconds * fps
    frames = np.empty((n, size, size, 3), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        frames[i, ..., 0] = (xx + 3 * i) % 256
        frames[i, ..., 1] = (yy + 2 * i) % 256
        frames[i, ..., 2] = (i * 7) % 256
    V.write_video(path, frames, fps=fps, crf=23)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def compare_with_pil(path: str, total: int, fps: float, target: int) -> dict:
    """How far the device resizes are from PIL's: per pixel at `target` and 32 px, and on the
    embeddings of tiny towers at those sizes (relative max |difference|)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from longrl_jax.models import VLM, ModelConfig
    from longrl_jax.models.config import VisionConfig
    from longrl_jax.models.image_resize import resize_bicubic

    native, _ = V.decode_frames(path, V.Sampling(num_frames=8, size=target))
    out = {}
    print(f"\n{'vs PIL bicubic':<28} {'px':>4} {'max |d| (levels)':>16} {'mean |d|':>9} "
          f"{'embed rel max |d|':>17}")
    for size in (target, 32):
        pil = V.resize(native, size).astype(np.float32)
        ours = np.asarray(jax.jit(lambda x, s=size: resize_bicubic(x, s, s))(native))
        jimg = np.asarray(jax.jit(lambda x, s=size: jax.image.resize(
            x.astype(jnp.float32), x.shape[:1] + (s, s, 3), "bicubic"))(native))
        vision = ModelConfig.tiny().vision
        if size != vision.image_size:
            vision = VisionConfig(hidden_size=48, intermediate_size=96, num_layers=2,
                                  num_heads=4, image_size=size, patch_size=14)
        model = VLM(ModelConfig.tiny().with_vision(vision), rngs=nnx.Rngs(0))
        encode = jax.jit(lambda x, m=model: m.encode_video(x))
        ref = np.asarray(encode(V.normalize(pil.astype(np.uint8))))
        for name, frames, levels in [
                ("device (Pillow arithmetic)", ours.astype(np.float32), ours),
                ("jax.image.resize bicubic", np.clip(jimg, 0, 255),
                 np.clip(np.rint(jimg), 0, 255))]:
            emb = np.asarray(encode((frames / 255.0 - 0.5) / 0.5))
            row = {"max_abs_levels": float(np.abs(frames - pil).max()),
                   "mean_abs_levels": float(np.abs(frames - pil).mean()),
                   "rounded_pixels_differing": float((levels != pil).mean()),
                   "embedding_rel_max_diff": float(np.abs(emb - ref).max() / np.abs(ref).max())}
            out[f"{name} @ {size}px"] = row
            print(f"{name:<28} {size:>4} {row['max_abs_levels']:>16.3f} "
                  f"{row['mean_abs_levels']:>9.4f} {row['embedding_rel_max_diff']:>17.2e}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/longrl_bench_video")
    ap.add_argument("--size", type=int, default=256, help="pixels of the generated video")
    ap.add_argument("--target", type=int, default=448, help="resize target (SigLIP 448)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--compute_threads", type=int, default=1,
                    help="host threads for the compute step; 1 models an accelerator, whose "
                         "compute leaves the host cores to the decoder (0: XLA's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.compute_threads:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false"
                                   f" intra_op_parallelism_threads={args.compute_threads}")

    import decord
    import jax
    import jax.numpy as jnp

    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, f"two_minutes_{args.size}.mp4")
    if not os.path.exists(path):
        start = time.perf_counter()
        make_video(path, 120, 30, args.size)
        print(f"generated {path} in {time.perf_counter() - start:.0f}s")
    from longrl_jax.models.siglip import FramePreprocess

    total, fps = V.video_info(path)
    rows = []
    preprocess = jax.jit(FramePreprocess(args.target))
    print(f"{'frames':>6} {'raw fps':>9} {'loader fps':>11} {'loader/raw':>10} "
          f"{'host PIL fps':>12} {'preprocess fps':>14}")
    for n in (64, 512):
        sampling = V.Sampling(num_frames=n, size=args.target)
        idx = V.sample_indices(total, fps, sampling)
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        raw_s, loader_s = [], []
        for _ in range(args.repeats):  # interleaved, so load on the shared machine hits both
            raw_s.append(best_of(lambda vr=vr, idx=idx: vr.get_batch(idx.tolist()).asnumpy(), 1))
            loader_s.append(best_of(lambda sampling=sampling: V.decode_frames(path, sampling), 1))
        raw, loader = min(raw_s), min(loader_s)
        host = best_of(lambda sampling=sampling: V.load_frames(path, sampling), 1)
        native, _ = V.decode_frames(path, sampling)
        jax.block_until_ready(preprocess(native))
        prep = best_of(lambda native=native: jax.block_until_ready(preprocess(native)), 2)
        rows.append({"frames": n, "raw_fps": n / raw, "loader_fps": n / loader,
                     "loader_over_raw": raw / loader, "host_pil_fps": n / host,
                     "host_pil_over_raw": raw / host, "preprocess_fps": n / prep,
                     "loader_then_preprocess_fps": n / (loader + prep)})
        print(f"{n:>6} {n / raw:>9.1f} {n / loader:>11.1f} {raw / loader:>10.2f} "
              f"{n / host:>12.1f} {n / prep:>14.1f}")

    difference = compare_with_pil(path, total, fps, args.target)

    sampling = V.Sampling(num_frames=64, size=args.target)
    decode_s = best_of(lambda: V.decode_frames(path, sampling), 1)
    x = jnp.ones((512, 512), jnp.float32)
    step = jax.jit(lambda x, f: jnp.tanh(x @ x).sum() + preprocess(f).mean())
    frames0, _ = V.decode_frames(path, sampling)
    jax.block_until_ready(step(x, frames0))
    one = best_of(lambda: jax.block_until_ready(step(x, frames0)), 3)
    reps = max(1, int(round(decode_s / one)))

    def compute(frames):
        for _ in range(reps):
            out = step(x, frames)
        jax.block_until_ready(out)

    items = [path] * args.videos

    def sequential():
        for p in items:
            compute(V.decode_frames(p, sampling)[0])

    def overlapped():
        for _, frames, _ in V.FramePrefetcher(items, lambda p: p, sampling, workers=1, depth=2,
                                              native=True):
            compute(frames)

    seq = best_of(sequential, 1)
    ovl = best_of(overlapped, 1)
    overlap = {"videos": args.videos, "decode_s": decode_s, "compute_s": one * reps,
               "sequential_s": seq, "overlapped_s": ovl, "speedup": seq / ovl,
               "ideal_speedup": (decode_s + one * reps) / max(decode_s, one * reps)}
    print(f"\noverlap: {args.videos} videos x (decode {decode_s:.2f}s + compute "
          f"{one * reps:.2f}s): sequential {seq:.2f}s, prefetched {ovl:.2f}s -> "
          f"{seq / ovl:.2f}x (ideal {overlap['ideal_speedup']:.2f}x on free cores)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
                       "compute_threads": args.compute_threads,
                       "video": {"frames": total, "fps": fps, "size": args.size},
                       "target": args.target, "sampling": rows,
                       "pil_difference": difference, "overlap": overlap}, f, indent=1)


if __name__ == "__main__":
    main()
