"""Seconds per RL step against frame count, with and without MR-SP (a proxy of paper Figure 2).

  python bench/rl_step.py --quick --out /tmp/rl_step.json          # tiny, 8 and 32 frames, ~2 min
  python bench/rl_step.py --out bench/results/rl_step.json          # small preset, 8..128 frames
  python bench/rl_step.py --preset tiny --frames 16 64 --modes none none-G stage1 --out ...

The paper's protocol (docs/REFERENCE.md, "MR-SP protocol"): 8 devices, one prompt per device,
G = 5 rollouts per prompt, SP degree 4. One step here is what the trainer (`rl/trainer.py`) does
on device after the rollouts are back, in three modes:

  none      no MR-SP: every pass (old-policy log-probs, reference log-probs, update) re-encodes
            each prompt's video with the vision tower inside the jitted pass, each device
            encoding its own prompt's frames (3 encodes per video per step); no sequence
            parallelism (mesh fsdp = all devices, sequence = 1; dense attention).
  none-G    (optional, `--modes`) as `none`, but every rollout re-encodes its video: 3 x G
            encodes per video per step, what a per-sample pipeline without an embedding cache
            pays (docs/REFERENCE.md, "MR-SP protocol": the paper does not say which of the
            two Long-RL's baseline does).
  stage1    MR-SP stage 1: each video encoded once, its frames sharded over all devices
            (`encode_video_sharded`), the rows taken to the host as the trainer's embedder does,
            and reused by the three passes; no sequence parallelism.
  stage1+2  stage 1 plus stage 2: mesh sequence = `--sp` (4), fsdp = the rest (2), ring attention
            on the sequence in `--layout` order (`sp.layout`; zig-zag, the trainers' default).

The passes are the trainer's own jitted functions (`make_logprob_fn`, `make_update_fn`, one
update over all B = prompts x G rows, i.e. minibatch = the whole batch, one PPO epoch, in
micro-batches of `--micro_batch_size` sequences per device), fed by `batch_lib.build_batch` /
`place_batch`. For `none` the model is wrapped so that its `video_table` encodes frames passed
in place of the table; nothing else differs. All modes' models are
alive at once (memory = modes x (model + reference + Adam)).

Rollout generation is OUT OF SCOPE (it runs in the vLLM server): every response is a fixed random
token sequence of `--response_len` (64) tokens, and the advantages are random. Timed: encode +
host batch + old and reference log-probs + one update, after one untimed compile-and-warm-up
step per (mode, frames); the median of `--repeats`, the modes interleaved (one step of each in
turn) so that load from other jobs hits them alike. The vision tower is frozen (RL trains the
LLM only, as the trainer does).

Rows: {"mode", "frames", "tokens", "seconds" (median), "min_s", "devices", "preset", "sp",
"encode_s", "logprob_s", "update_s", "compile_s", ...}. On CPU the devices are fake (they share
the host's cores), so stage 2 cannot speed anything up there and collectives are memcpys: the
CPU numbers are a proxy of the work per step (how many encodes, how many passes), not of a GPU
mesh.
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
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from configs import (
    common,  # noqa: E402
    demo,  # noqa: E402
)
from longrl_jax import batch as batch_lib  # noqa: E402
from longrl_jax import prompts as prompts_lib
from longrl_jax.build import build_model, copy_model  # noqa: E402
from longrl_jax.build import rules as config_rules
from longrl_jax.config_check import validate  # noqa: E402
from longrl_jax.grad_accumulation import num_micro_batches  # noqa: E402
from longrl_jax.models.splice import splice_layout  # noqa: E402
from longrl_jax.optim import optimizer  # noqa: E402
from longrl_jax.parallel import mesh as mesh_lib  # noqa: E402
from longrl_jax.parallel import video_encoding as video_lib
from longrl_jax.rl.trainer import make_logprob_fn, make_update_fn  # noqa: E402

MODES = ("none", "stage1", "stage1+2")
ALL_MODES = ("none", "none-G", "stage1", "stage1+2")
VIDEO_ID, SEP_ID = 5, 6          # any ids of the preset's vocabulary
PROMPT_TEXT = 32                 # text tokens around the video placeholder


# ------------------------------------------------------------------------------------------------
# Model and config
# ------------------------------------------------------------------------------------------------

def make_config(args, sp: int):
    c = demo.get_config("quick")
    c.stages = ("rl",)
    c.model.preset = args.preset
    c.model.vocab_size = args.vocab_size
    c.model.param_dtype = c.model.dtype = args.dtype
    c.model.remat = args.remat
    c.model.scan_layers = args.scan_layers
    c.mesh = common.mesh_config(fsdp=-1, sequence=sp)
    c.sp = common.sp_config(strategy=args.strategy, layout=args.layout,
                            frames_per_chunk=args.frames_per_chunk)
    prompts = args.prompts_per_device * jax.device_count()
    c.rl = common.rl_config(steps=1, prompts_per_step=prompts, group_size=args.group_size,
                            lr=1e-6, max_response_tokens=args.response_len,
                            micro_batch_size=args.micro_batch_size)
    c.rollout = common.rollout_config(max_model_len=1 << 20)
    errors = validate(c)
    if errors:
        raise SystemExit("invalid config:\n  " + "\n  ".join(errors))
    return c


def build(config, image_size: int | None):
    """`build_model` for the config's preset; with `image_size`, the same steps (parameters
    created in their shards, SP attention on a 'sequence' mesh axis) for the preset with its
    vision tower at another frame size: more patches and more tokens per frame."""
    adjust = (lambda cfg: cfg.with_vision(dataclasses.replace(cfg.vision, image_size=image_size))
              ) if image_size else None
    return build_model(config, video_token_id=VIDEO_ID, separator_token_id=SEP_ID,
                       adjust=adjust)


class ReencodingVLM(nnx.Module):
    """The `none` mode: the passes get frames [N, H, W, C] in place of the video table and run
    the vision tower on them, so every jitted pass re-encodes the video (no stage 1)."""

    def __init__(self, vlm):
        self.vlm = vlm

    @property
    def llm(self):
        return self.vlm.llm

    def video_table(self, frames_nhwc):
        rows = self.vlm.encode_video(frames_nhwc)
        return rows.reshape(1, -1, rows.shape[-1])     # sequence 1: one shard, all rows


# ------------------------------------------------------------------------------------------------
# Inputs: prompts with their videos, fixed random responses
# ------------------------------------------------------------------------------------------------

def make_inputs(cfg, n_prompts: int, frames: int, response_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    v = cfg.vision
    videos = [rng.standard_normal((frames, v.image_size, v.image_size, v.num_channels))
              .astype(np.float32) for _ in range(n_prompts)]
    vocab = cfg.llm.vocab_size
    layouts = []
    for _ in range(n_prompts):
        ids = rng.integers(16, vocab, PROMPT_TEXT).astype(np.int32)
        ids[PROMPT_TEXT // 2] = VIDEO_ID
        layouts.append((ids, splice_layout(ids, video_token_id=VIDEO_ID, frames_per_video=[frames],
                                           tokens_per_frame=cfg.tokens_per_frame,
                                           separator_id=SEP_ID)))
    responses = [rng.integers(16, vocab, response_len).astype(np.int32)
                 for _ in range(n_prompts)]
    return videos, layouts, responses


def prompts_with(layouts, video_rows):
    return [prompts_lib.Prompt(None, ids, layout, f"video{i}", rows)
            for i, ((ids, layout), rows) in enumerate(zip(layouts, video_rows))]


# ------------------------------------------------------------------------------------------------
# One step
# ------------------------------------------------------------------------------------------------

class Stepper:
    """One mode's model, reference, optimizer and jitted passes, built once per mode."""

    def __init__(self, args, mode: str):
        self.mode = mode
        self.sp = args.sp if mode == "stage1+2" else 1
        self.config = make_config(args, self.sp)
        vlm, self.mesh = build(self.config, args.image_size)
        self.cfg = vlm.cfg
        self.vlm = vlm
        self.model = ReencodingVLM(vlm) if mode.startswith("none") else vlm
        self.ref = copy_model(self.model)   # the frozen KL anchor, as the trainer keeps it
        self.opt = optimizer(self.model, self.config.rl.optimizer, "llm")
        self.logprob_fn = make_logprob_fn(self.mesh)
        self.update_fn = make_update_fn(self.mesh, self.config.rl)
        self.rules = config_rules(self.config)
        self.g = self.config.rl.group_size
        self.r = self.config.rl.max_response_tokens

    def step(self, videos, layouts, responses) -> dict:
        t = {}
        start = time.perf_counter()
        d = self.cfg.llm.hidden_size
        if self.mode.startswith("none"):
            rows = [np.zeros((f.shape[0] * self.cfg.tokens_per_frame, d), np.float32)
                    for f in videos]          # never read: the passes encode the frames
        else:  # stage 1, as `VideoEmbedder` runs it (rows to the host, once per video)
            rows = [np.asarray(video_lib.encode_video_sharded(
                self.vlm, jnp.asarray(f), mesh=self.mesh,
                frames_per_chunk=self.config.sp.frames_per_chunk, rules=self.rules),
                np.float32).reshape(-1, d) for f in videos]
        t["encode_s"] = time.perf_counter() - start
        mark = time.perf_counter()
        prompts = prompts_with(layouts, rows)
        episodes = [p for p in prompts for _ in range(self.g)]
        if self.mode == "none-G":  # one key per rollout: build_batch keeps G copies of a video
            episodes = [dataclasses.replace(p, video_key=f"{p.video_key}/{k % self.g}")
                        for k, p in enumerate(episodes)]
        resp = [r for r in responses for _ in range(self.g)]
        layout = self.config.sp.layout
        batch = batch_lib.build_batch(episodes, resp, response_len=self.r,
                                      length_multiple=batch_lib.length_multiple(self.mesh, layout))
        batch = batch_lib.in_layout(batch, self.mesh, layout)
        placed = batch_lib.place_batch(batch, self.mesh)     # already in layout order
        if self.mode.startswith("none"):  # each device holds (and encodes) its prompts' frames
            frames = videos if self.mode == "none" else [f for f in videos for _ in range(self.g)]
            bax = mesh_lib.batch_axes(self.mesh, len(frames))
            placed["video_table"] = jax.device_put(np.concatenate(frames),
                                                   NamedSharding(self.mesh, P(bax)))
        jax.block_until_ready(placed)
        t["host_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        old_logp, _ = jax.device_get(self.logprob_fn(self.model, placed))
        ref_logp, _ = jax.device_get(self.logprob_fn(self.ref, placed))
        t["logprob_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        adv = np.random.default_rng(0).standard_normal(old_logp.shape[0]).astype(np.float32)
        adv = np.broadcast_to(adv[:, None], old_logp.shape)
        n = num_micro_batches(len(resp), self.config.rl.micro_batch_size, self.mesh,
                              self.rules)
        micro = batch_lib.place_micro_batches(
            dict(batch.row_arrays(), adv=np.ascontiguousarray(adv), old_logp=old_logp,
                 ref_logp=ref_logp), n, self.mesh, self.rules, zero=("mask", "adv"))
        m = self.update_fn(self.model, self.opt, micro, placed["video_table"])
        m = jax.device_get(m)
        t["update_s"] = time.perf_counter() - mark
        t["seconds"] = time.perf_counter() - start
        t["tokens"] = int(batch.token_ids.shape[1])
        t["rows"] = int(batch.token_ids.shape[0])
        t["finite"] = bool(np.isfinite(m["loss"]))
        return t


def measure(steppers: list[Stepper], frames: int, args) -> list[dict]:
    """All modes at one frame count; the repeats interleave the modes (one step of each in
    turn), so that load from other jobs on a shared machine hits every mode alike."""
    n = args.prompts_per_device * jax.device_count()
    videos, layouts, responses = make_inputs(steppers[0].cfg, n, frames, args.response_len)
    compile_s = {}
    for st in steppers:
        start = time.perf_counter()
        st.step(videos, layouts, responses)        # compile + warm up
        compile_s[st.mode] = time.perf_counter() - start
    runs = {st.mode: [] for st in steppers}
    for _ in range(args.repeats):
        for st in steppers:
            runs[st.mode].append(st.step(videos, layouts, responses))
    rows = []
    for st in steppers:
        rs = runs[st.mode]
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("seconds", "encode_s", "host_s", "logprob_s", "update_s")}
        rows.append({"mode": st.mode, "frames": frames, "tokens": rs[0]["tokens"],
                     "seconds": round(med["seconds"], 4),
                     "min_s": round(min(r["seconds"] for r in rs), 4),
                     "devices": jax.device_count(),
                     "preset": args.preset, "sp": st.sp, "prompts": n, "group_size": st.g,
                     "batch_rows": rs[0]["rows"], "response_len": args.response_len,
                     **{k: round(v, 4) for k, v in med.items() if k != "seconds"},
                     "compile_s": round(compile_s[st.mode], 2), "repeats": args.repeats,
                     "all_s": [round(r["seconds"], 4) for r in rs], "finite": rs[0]["finite"]})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset, 8 and 32 frames")
    ap.add_argument("--out", default=None, help="write rows + meta as JSON here")
    ap.add_argument("--preset", default=None,
                    help="a ModelConfig preset with a vision tower (default: small; tiny with "
                         "--quick)")
    ap.add_argument("--vocab_size", type=int, default=512, help="for the tiny/small presets")
    ap.add_argument("--frames", type=int, nargs="+", default=None)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=ALL_MODES)
    ap.add_argument("--sp", type=int, default=4, help="sequence axis of stage1+2")
    ap.add_argument("--strategy", default="ring", choices=["ring", "ulysses", "all_gather_kv"])
    ap.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"],
                    help="sequence layout of stage1+2 (config.sp.layout)")
    ap.add_argument("--prompts_per_device", type=int, default=1)
    ap.add_argument("--group_size", type=int, default=5, help="G rollouts per prompt")
    ap.add_argument("--response_len", type=int, default=64)
    ap.add_argument("--image_size", type=int, default=None,
                    help="frame size for the preset's vision tower (default: the preset's; "
                         "tiny/small: 32 px, patch 8 -> 4 tokens per frame)")
    ap.add_argument("--frames_per_chunk", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--micro_batch_size", type=int, default=0,
                    help="rl.micro_batch_size: sequences per device per update micro-batch")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--scan_layers", action="store_true")
    args = ap.parse_args()
    frames = args.frames or ([8, 32] if args.quick else [8, 16, 32, 64, 128])
    args.preset = args.preset or ("tiny" if args.quick else "small")
    n_dev = jax.device_count()
    modes = list(args.modes)
    if "stage1+2" in modes and (args.sp < 2 or n_dev % args.sp):
        print(f"skipping stage1+2: sp={args.sp} does not divide {n_dev} devices")
        modes.remove("stage1+2")

    rows = []
    print(f"{'mode':>9} {'frames':>6} {'tokens':>6} {'s/step':>8} {'encode':>7} {'logp':>7} "
          f"{'update':>7} {'compile':>7}")
    steppers = [Stepper(args, mode) for mode in modes]
    for f in frames:
        for r in measure(steppers, f, args):
            rows.append(r)
            print(f"{r['mode']:>9} {f:>6} {r['tokens']:>6} {r['seconds']:>8.3f} "
                  f"{r['encode_s']:>7.3f} {r['logprob_s']:>7.3f} {r['update_s']:>7.3f} "
                  f"{r['compile_s']:>7.1f}", flush=True)

    ratios = {}
    for stat, title in (("seconds", "median"), ("min_s", "best")):
        sec = {(r["mode"], r["frames"]): r[stat] for r in rows}
        print(f"\nseconds per step, {title} of {args.repeats} (rows: mode, columns: frames)")
        print(f"{'':>15}" + "".join(f"{f:>9}" for f in frames))
        for mode in modes:
            print(f"{mode:>15}" + "".join(f"{sec[(mode, f)]:>9.3f}" for f in frames))
        for base in ("none", "none-G"):
            for other in ("stage1", "stage1+2"):
                if base in modes and other in modes:
                    key = f"{base}/{other}"
                    ratio = {f: round(sec[(base, f)] / sec[(other, f)], 3) for f in frames}
                    ratios[key if stat == "seconds" else f"{key} (best)"] = ratio
                    print(f"{key:>15}" + "".join(f"{ratio[f]:>9.2f}" for f in frames))
    dev = jax.devices()[0]
    meta = {"date": datetime.date.today().isoformat(), "platform": dev.platform,
            "device_kind": dev.device_kind, "devices": n_dev, "host": platform.processor()
            or platform.machine(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "preset": args.preset, "image_size": steppers[0].cfg.vision.image_size,
            "tokens_per_frame": steppers[0].cfg.tokens_per_frame + 1,
            "group_size": args.group_size,
            "prompts_per_device": args.prompts_per_device, "response_len": args.response_len,
            "sp": args.sp, "strategy": args.strategy, "dtype": args.dtype,
            "rollout": "not timed: fixed random response tokens of response_len stand in for "
                       "the vLLM rollouts; advantages are random",
            "timed": "encode + host batch + old and reference log-probs + one update (median "
                     "of repeats, after a compile/warm-up step)",
            "meaningful": dev.platform != "cpu",
            "note": "CPU: fake devices share the host cores; a proxy of the work per step, "
                    "not of a GPU mesh" if dev.platform == "cpu" else ""}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "ratios": ratios}, fh, indent=1)


if __name__ == "__main__":
    main()
