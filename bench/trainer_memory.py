"""Per-device memory of the trainers' own steps, from XLA's memory analysis (compiled, never run).

Compiles the RL update, the RL log-prob step and the SFT step, the very function objects the
trainers call (`rl.trainer.make_update_fn`, `rl.trainer.make_logprob_fn`, `sft.trainer.make_step`,
obtained in `step_functions` at call time), for an experiment config on N fake CPU devices, with
an abstract model and optimizer (`build.abstract_model`, `mesh.abstract_sharded`: every leaf a
`jax.ShapeDtypeStruct` carrying its NamedSharding, nothing allocated) and abstract batches in the
trainers' shardings (`batch.row_sharding`). It reads `lower(...).compile().memory_analysis()`,
which for an SPMD executable is per device.

  python bench/trainer_memory.py --config configs/longvila_r1_7b_grpo.py --frames 1024 2048 \\
      --sequence 4 8 --devices 8 --out /tmp/trainer_memory.json [--config.rl.micro_batch_size=2]

Shapes, as the trainers make them: T = prompt (--prompt_tokens) + frames * (tokens per frame + 1
"\\n" separator) + the response (rl/sft.max_response_tokens), rounded up to
`batch.length_multiple`; R = max_response_tokens; micro-batches from the config's micro-batch
sizes and `grad_accumulation.num_micro_batches`, as in `rl.trainer.minibatch_updates`,
`rl.trainer.logprobs_in_micro_batches` and `sft.trainer.make_batch`. The video table is
`table_struct`'s [S, N_s, D] (`batch.in_layout`'s split table) in the model's compute
dtype, sharded over 'sequence'; a mini-batch's videos (`rl.trainer.StepVideo`: mini-batches of
whole groups) for the update and the log-prob pass, the SFT batch's videos for SFT.

Each row: {"stage", "frames", "tokens", "sequence", "devices", "micro_batch", "num_micro",
"videos", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "resident_bytes",
"resident", "offload", "host_offload_bytes", "peak_bytes_per_device", "compile_s"}, bytes per
device. `resident_bytes` is device memory the trainer holds through the call that is not in
the executable's arguments: the reference model (rl.kl_coef > 0, in the compute dtype; in the
update only without rl.ref_on_host), the other mini-batches' video tables of the step (without
rl.video_on_host), the optimizer state during the log-prob pass, and arguments jit pruned as
unused. `host_offload_bytes`: the layer inputs `model.remat_offload` keeps in host memory,
read from the step's jaxpr (XLA:CPU has a single memory and counts them in temp_bytes).
peak_bytes_per_device = argument + output + temp - alias + resident - host_offload. The update
and SFT step donate params and optimizer state (alias_bytes).
"""

from __future__ import annotations

import os
import sys


def _device_count(argv: list[str]) -> int:
    """--devices N / --devices=N (default 8), read before jax is imported."""
    for i, a in enumerate(argv):
        if a == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
    return 8


if __name__ == "__main__":   # XLA_FLAGS must be set before jax is imported
    _flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(
        _flags + [f"--xla_force_host_platform_device_count={_device_count(sys.argv)}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from longrl_jax import batch as batch_lib  # noqa: E402
from longrl_jax import build, optim  # noqa: E402
from longrl_jax.grad_accumulation import num_micro_batches  # noqa: E402
from longrl_jax.parallel import mesh as mesh_lib  # noqa: E402
from longrl_jax.rl import trainer as rl_trainer  # noqa: E402
from longrl_jax.sft import trainer as sft_trainer  # noqa: E402

STAGES = ("rl_update", "rl_logprobs", "sft_step")
GB = 1e9


# ================================================================================================
# The trainers' step functions
# ================================================================================================

def step_functions(mesh, config, stages=STAGES) -> dict:
    """The step functions, from the factories the trainers call (looked up on the trainer
    modules at call time): what is compiled here is what `rl.trainer.train` and
    `sft.trainer.train` run."""
    rules = build.rules(config)
    makers = {"rl_update": lambda: rl_trainer.make_update_fn(mesh, config.rl, rules),
              "rl_logprobs": lambda: rl_trainer.make_logprob_fn(mesh, rules),
              "sft_step": lambda: sft_trainer.make_step(mesh, rules)}
    return {s: makers[s]() for s in stages}


# ================================================================================================
# Abstract arguments
# ================================================================================================

def _round_up(x: int, m: int) -> int:
    return max(m, -(-x // m) * m)


def _struct(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def device_bytes(tree) -> int:
    """Bytes of one device's shards of an abstract (or placed) pytree; the largest shard when
    devices differ (they do not under NamedSharding with dividing axes)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def table_struct(mesh, videos: int, rows_per_video: int, d: int, dtype
                 ) -> jax.ShapeDtypeStruct:
    """The split video table [S, N_s, D] of `videos` videos of `rows_per_video` rows, as
    `batch.in_layout` makes it: S = the 'sequence' axis, N_s = an even share of the rows
    padded as `batch.table_rows` pads it, sharded as `batch.table_sharding`, in the model's
    compute dtype."""
    s = mesh.shape["sequence"]
    n_s = batch_lib.table_rows(-(-videos * rows_per_video // s))
    dtype = batch_lib.table_bits(np.zeros((), dtype)).dtype     # as `batch.place_table` sends it
    return _struct((s, n_s, d), dtype, batch_lib.table_sharding(mesh))


ROW_FIELDS = {"token_ids": ("T", jnp.int32), "video_rows": ("T", jnp.int32),
              "positions": ("T", jnp.int32), "valid": ("T", jnp.bool_),
              "rows": ("R", jnp.int32), "targets": ("R", jnp.int32), "mask": ("R", jnp.float32)}
RL_FIELDS = {"adv": (None, jnp.float32), "old_logp": ("R", jnp.float32),
             "ref_logp": ("R", jnp.float32)}


def row_structs(mesh, rules, lead: tuple[int, ...], t: int, r: int, rl: bool = False) -> dict:
    """Per-row fields [*lead, ...] (`lead` = (n, m) stacked micro-batches, or (m,)) in the
    trainers' shardings (`batch.row_sharding`)."""
    fields = dict(ROW_FIELDS, **(RL_FIELDS if rl else {}))
    out = {}
    for name, (dim, dtype) in fields.items():
        shape = lead + ({"T": (t,), "R": (r,), None: ()}[dim])
        out[name] = _struct(shape, dtype, batch_lib.row_sharding(
            mesh, name, shape, rules, stacked=len(lead) == 2))
    return out


@dataclasses.dataclass
class Shapes:
    """A stage's shapes, derived as its trainer derives them."""
    t: int               # sequence length (tokens, padded)
    r: int               # response rows
    n: int               # micro-batches per step call (1 for the log-prob step: one per call)
    m: int               # sequences per micro-batch (all devices)
    videos: int          # distinct videos in the call's table


def stage_shapes(stage: str, config, mesh, rules, frames: int, tokens_per_frame: int,
                 prompt_tokens: int) -> Shapes:
    c = config.rl if stage.startswith("rl") else config.sft
    r = c.max_response_tokens
    t = _round_up(prompt_tokens + frames * (tokens_per_frame + 1) + r,
                  batch_lib.length_multiple(mesh, config.sp.layout))
    if stage.startswith("rl"):            # rl.trainer.StepVideo: mini-batches of whole groups
        mb = min(c.minibatch_size, c.prompts_per_step * c.group_size)
        videos = max(1, -(-mb // c.group_size))
        if stage == "rl_update":          # rl.trainer.minibatch_updates
            m = rl_trainer.micro_batch_rows(mb, c.micro_batch_size, mesh, rules)
            return Shapes(t, r, -(-mb // m), m, videos)
        # rl.trainer.logprobs_in_micro_batches: one micro-batch per call
        return Shapes(t, r, 1, rl_trainer.micro_batch_rows(mb, c.logprob_micro_batch_size,
                                                            mesh, rules), videos)
    rows = c.batch_size                   # sft.trainer.make_batch: one video per example
    n = num_micro_batches(rows, c.micro_batch_size, mesh, rules)
    return Shapes(t, r, n, -(-rows // n), rows)


# ================================================================================================
# One measurement
# ================================================================================================

def abstract_state(config, adjust=None):
    """(model, mesh): the configured model, abstract and in its shards."""
    return build.abstract_model(config, adjust=adjust)


def abstract_optimizer(model, mesh, config, opt_cfg, trainable: str):
    """`optim.optimizer` (the trainers' optimizer) evaluated abstractly, in its shards."""
    return mesh_lib.abstract_sharded(lambda m: optim.optimizer(m, opt_cfg, trainable), mesh,
                                     build.rules(config), model)


def stage_args(stage: str, model, opt, mesh, config, shapes: Shapes, table):
    """The step's arguments, as the trainer passes them."""
    rules = build.rules(config)
    if stage == "rl_update":
        return (model, opt, row_structs(mesh, rules, (shapes.n, shapes.m), shapes.t, shapes.r,
                                        rl=True), table)
    if stage == "rl_logprobs":
        return (model, dict(row_structs(mesh, rules, (shapes.m,), shapes.t, shapes.r),
                            video_table=table))
    shared = {"video_table": table}
    if config.sft.trainable != "llm":     # frames travel with the batch; the tower runs inside
        v = model.cfg.vision
        shared["frames"] = _struct((shapes.videos, config.sft.num_frames, v.image_size,
                                    v.image_size, 3), jnp.float32, NamedSharding(mesh, P()))
    return (model, opt, row_structs(mesh, rules, (shapes.n, shapes.m), shapes.t, shapes.r),
            shared)


def host_offload_bytes(fn, args, per_device: int) -> int:
    """Bytes per device the step keeps in host memory: the stacked layer inputs a scan saves
    with `model.remat_offload` (jaxpr values in host memory space). XLA:CPU has one memory
    and leaves them in `temp_bytes`; a GPU/TPU compile puts them in host memory instead."""
    total = 0

    def walk(jaxpr):
        nonlocal total
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                for v in eqn.outvars:
                    if "<host>" in str(v.aval):
                        total += math.prod(v.aval.shape) * np.dtype(v.aval.dtype).itemsize
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    walk(inner)
                elif hasattr(p, "eqns"):
                    walk(p)
    walk(fn.trace(*args).traced.jaxpr.jaxpr)
    return total // per_device


def compile_memory(fn, args) -> tuple[dict, float]:
    """XLA's per-device memory analysis of `fn` (an nnx.jit function) compiled for `args`."""
    start = time.time()
    mem = fn.lower(*args).compile().memory_analysis()
    out = {"argument_bytes": int(mem.argument_size_in_bytes),
           "output_bytes": int(mem.output_size_in_bytes),
           "temp_bytes": int(mem.temp_size_in_bytes),
           "alias_bytes": int(mem.alias_size_in_bytes)}
    return out, time.time() - start


def measure(config, frames: int, sequence: int, devices: int, stages=STAGES, layers: int = 0,
            prompt_tokens: int = 64, log=print) -> list[dict]:
    """Rows for one (frames, sequence) point: every stage compiled, never run."""
    config = config.copy_and_resolve_references()
    config.mesh.sequence = sequence
    config.data.num_frames = frames
    config.sft.num_frames = frames
    adjust = None
    if layers:
        adjust = lambda cfg: cfg.replace(  # noqa: E731
            llm=dataclasses.replace(cfg.llm, num_layers=layers))
    model, mesh = abstract_state(config, adjust)
    cfg = model.cfg
    d, dtype = cfg.llm.hidden_size, getattr(jnp, config.model.dtype)
    tpf = cfg.tokens_per_frame
    rules = build.rules(config)
    fns = step_functions(mesh, config, tuple(stages))
    ref_params = device_bytes([jax.ShapeDtypeStruct(
        x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
        sharding=x.sharding) for x in _values(model)])    # rl.trainer.RefModel
    rows = []
    opts = {}
    for stage in stages:
        shapes = stage_shapes(stage, config, mesh, rules, frames, tpf, prompt_tokens)
        kind = "sft" if stage == "sft_step" else "rl"
        if kind not in opts:
            c = config.sft if kind == "sft" else config.rl
            opts[kind] = abstract_optimizer(model, mesh, config, c.optimizer,
                                            config.sft.trainable if kind == "sft" else "llm")
        opt = opts[kind]
        table = table_struct(mesh, shapes.videos, frames * tpf, d, dtype)
        args = stage_args(stage, model, opt, mesh, config, shapes, table)
        mem, secs = compile_memory(fns[stage], args)
        per_device = math.prod(mesh.shape[a] for a in mesh_lib.AXES)
        offload = host_offload_bytes(fns[stage], args, per_device) \
            if config.model.get("remat_offload") else 0
        given = device_bytes([_values(a) for a in args])
        resident = {"unused_arguments": max(0, given - mem["argument_bytes"])}
        rl = config.rl
        if stage.startswith("rl"):
            if rl.kl_coef and (stage == "rl_logprobs" or not rl.ref_on_host):
                resident["reference_params"] = ref_params     # rl.trainer.RefModel
            if not rl.video_on_host:      # the step's other mini-batches' tables wait on device
                steps = rl.prompts_per_step * rl.group_size
                others = -(-steps // min(rl.minibatch_size, steps)) - 1
                resident["other_minibatch_tables"] = others * device_bytes([table])
        if stage == "rl_logprobs":
            resident["optimizer_state"] = device_bytes(_values(opt))
        res = sum(resident.values())
        rows.append({
            "stage": stage, "frames": frames, "tokens": shapes.t, "sequence": sequence,
            "devices": devices, "micro_batch": shapes.m, "num_micro": shapes.n,
            "response_tokens": shapes.r, "videos": shapes.videos,
            "layers": cfg.llm.num_layers, **mem, "resident_bytes": res, "resident": resident,
            "offload": bool(config.model.get("remat_offload")), "host_offload_bytes": offload,
            "peak_bytes_per_device": mem["argument_bytes"] + mem["output_bytes"]
            + mem["temp_bytes"] - mem["alias_bytes"] + res - offload,
            "compile_s": round(secs, 1)})
    return rows


def _values(x) -> list:
    """The leaves of a pytree whose nnx graph nodes (model, optimizer) stand for their state."""
    from flax import nnx
    is_node = lambda y: isinstance(y, (nnx.Module, nnx.Optimizer))  # noqa: E731
    out = []
    for y in jax.tree.leaves(x, is_leaf=is_node):
        out += jax.tree.leaves(nnx.state(y)) if is_node(y) else [y]
    return out


# ================================================================================================
# The command line
# ================================================================================================

def fits(rows: list[dict], budget_gb: float) -> dict[int, int | None]:
    """Per sequence degree: the largest measured frame count whose stages all fit."""
    out = {}
    for s in sorted({r["sequence"] for r in rows}):
        ok = [f for f in sorted({r["frames"] for r in rows if r["sequence"] == s})
              if all(r["peak_bytes_per_device"] <= budget_gb * GB for r in rows
                     if r["sequence"] == s and r["frames"] == f)]
        out[s] = max(ok) if ok else None
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'stage':<12} {'frames':>6} {'tokens':>8} {'sp':>3} {'micro':>5} {'n':>4} "
          f"{'args GB':>8} {'out GB':>7} {'temp GB':>8} {'alias GB':>8} {'resid GB':>8} "
          f"{'peak GB':>8} {'compile s':>9}")
    for r in rows:
        print(f"{r['stage']:<12} {r['frames']:>6} {r['tokens']:>8} {r['sequence']:>3} "
              f"{r['micro_batch']:>5} {r['num_micro']:>4} {r['argument_bytes'] / GB:>8.2f} "
              f"{r['output_bytes'] / GB:>7.2f} {r['temp_bytes'] / GB:>8.2f} "
              f"{r['alias_bytes'] / GB:>8.2f} {r['resident_bytes'] / GB:>8.2f} "
              f"{r['peak_bytes_per_device'] / GB:>8.2f} {r['compile_s']:>9.1f}", flush=True)


def parse(argv: list[str]):
    """(bench args, the config): the bench's own flags by argparse, `--config` and its
    `--config.x=...` overrides by ml_collections' absl flag."""
    from absl import flags
    from ml_collections import config_flags
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", required=True)
    ap.add_argument("--sequence", type=int, nargs="+", default=None,
                    help="sequence-parallel degrees (default: the config's mesh.sequence)")
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--layers", type=int, default=0, help="LLM depth (0: the config's)")
    ap.add_argument("--budget_gb", type=float, default=80.0)
    ap.add_argument("--prompt_tokens", type=int, default=64)
    args, rest = ap.parse_known_args(argv[1:])
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=fv)
    fv([argv[0]] + rest)
    if fv.config is None:
        ap.error("--config is required")
    return args, fv.config


def main(argv: list[str]) -> list[dict]:
    args, config = parse(argv)
    if jax.device_count() != args.devices:
        raise SystemExit(f"{jax.device_count()} devices, --devices {args.devices}: XLA_FLAGS "
                         "must be set before jax is imported (run this file as a script)")
    rows = []
    for s in args.sequence or [config.mesh.sequence]:
        for f in args.frames:
            rows += measure(config, f, s, args.devices, stages=args.stages, layers=args.layers,
                            prompt_tokens=args.prompt_tokens)
            print_table(rows[-len(args.stages):])
    print()
    print_table(rows)
    print()
    for s, f in fits(rows, args.budget_gb).items():
        print(f"sequence {s}: largest measured frame count with every stage within "
              f"{args.budget_gb:g} GB per device: {f if f is not None else 'none'}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv)
