"""What every stage of a run shares: data, tokenizer, model, mesh, embedder, metrics.

Built once by `main` and handed to the stage trainers, which stay readable single files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterator

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from longrl_jax import sequences
from longrl_jax.data import longvideo_reason as lvr
from longrl_jax.data import synthetic
from longrl_jax.data.video import VideoError
from longrl_jax.metrics import MetricWriter, Timers

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunContext:
    config: object
    workdir: str
    model: object
    mesh: object
    rules: tuple
    tokenizer: object
    tokens: sequences.Tokens
    tokenizer_dir: str
    records_dir: str
    embedder: object
    writer: MetricWriter
    timers: Timers
    judge: object = None
    skipped: dict = dataclasses.field(default_factory=dict)

    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)

    def prompts(self, examples) -> list[sequences.Prompt]:
        """Prompts for examples whose videos decode; the others are reported and skipped."""
        out = []
        for ex in examples:
            try:
                key, rows = self.embedder(ex.videos[0])
            except VideoError as e:
                self.skipped[ex.problem_id] = str(e)
                continue
            out.append(sequences.make_prompt(self.tokenizer, self.tokens, ex, rows, key,
                                             thinking=self.config.thinking))
        return out

    def loader(self, split: str, *, seed: int):
        source = lvr.data_source(self.records_dir, split)
        return lvr.loader(source, seed=seed, shuffle=True, num_epochs=None, shard_index=0,
                          shard_count=1)

    def eval_examples(self) -> list[lvr.Example]:
        source = lvr.data_source(self.records_dir, "eval")
        n = min(len(source), self.config.eval.num_examples or len(source))
        return [lvr.decode(source[i]) for i in range(n)]


def open_checkpoints(ctx: RunContext, stage: str, stage_cfg, model, opt, data_iter):
    """(TrainCheckpointer, first step) of a stage: restores model, optimizer and data
    iterator in place from the newest checkpoint, if there is one."""
    from longrl_jax.checkpoint import TrainCheckpointer

    ckpt = TrainCheckpointer(ctx.path("checkpoints", stage),
                             max_to_keep=stage_cfg.keep_checkpoints,
                             save_interval_steps=stage_cfg.checkpoint_every)
    if ckpt.latest_step() is None:
        return ckpt, 0
    extra = ckpt.restore(model=model, optimizer=opt)
    data_iter.set_state(extra["data_state"])
    log.info("%s: resumed at step %d", stage, extra["step"])
    return ckpt, extra["step"]


def next_examples(iterator: Iterator, n: int) -> list[lvr.Example]:
    return [next(iterator) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# Data preparation
# ------------------------------------------------------------------------------------------------

def fewest_frames(config) -> int | None:
    """The fewest frames any stage samples per video: synthetic events are made long enough
    for that sampling to see them."""
    counts = [config.data.num_frames]
    if "sft" in config.stages and config.sft.get("num_frames", 0):
        counts.append(config.sft.num_frames)
    counts = [n for n in counts if n]
    return min(counts) if counts else None


def prepare_data(config, workdir: str) -> tuple[str, str, str]:
    """(records_dir, video_dir, tokenizer_dir). The synthetic suite is generated once; the
    JSONL splits are written as array_record files grain reads."""
    d = config.dataset
    if d.kind == "synthetic":
        root = os.path.join(workdir, "data")
        if not os.path.exists(os.path.join(root, "eval.jsonl")):
            s = d.synthetic
            counts = synthetic.generate(root, num_train=s.num_train, num_eval=s.num_eval,
                                        num_frames=s.video_frames, seed=s.seed, size=s.size,
                                        tokenizer=True, sample_frames=fewest_frames(config),
                                        options=s.get("options", "shuffled"),
                                        distractors=s.get("distractors", True),
                                        traces=s.get("traces", "frames"))
            log.info("synthetic suite: %s", counts)
        train, evals = os.path.join(root, "train.jsonl"), os.path.join(root, "eval.jsonl")
        video_dir, tok_dir = os.path.join(root, "videos"), os.path.join(root, "tokenizer")
    else:
        train, evals, video_dir, tok_dir = d.train, d.eval, d.video_dir, d.tokenizer
        root = os.path.join(workdir, "data")
    records = os.path.join(root, "records")
    os.makedirs(root, exist_ok=True)
    if not os.path.exists(os.path.join(records, "done")):
        splits = {"train": train, "eval": evals}
        sft_n = config.sft.num_examples
        if sft_n:
            head = os.path.join(root, "sft.jsonl")
            with open(train) as src, open(head, "w") as dst:
                for i, line in enumerate(src):
                    if i >= sft_n:
                        break
                    dst.write(line)
            splits["sft"] = head
        report = lvr.build_array_records(records, splits, video_dir)
        with open(os.path.join(records, "done"), "w") as f:
            json.dump(report, f)
    return records, video_dir, tok_dir


# ------------------------------------------------------------------------------------------------
# Optimizers
# ------------------------------------------------------------------------------------------------

def optimizer(model, opt_cfg, trainable: str) -> nnx.Optimizer:
    """AdamW with global-norm clipping and linear warmup (Long-RL: constant lr after warmup)."""
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, opt_cfg.lr, max(opt_cfg.warmup_steps, 1)),
         optax.constant_schedule(opt_cfg.lr)], [max(opt_cfg.warmup_steps, 1)])
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip),
                     optax.adamw(sched, b1=opt_cfg.b1, b2=opt_cfg.b2,
                                 weight_decay=opt_cfg.weight_decay))
    opt = nnx.Optimizer(model, tx, wrt=trainable_filter(trainable))
    _onto_model_mesh(opt, model)
    return opt


def _onto_model_mesh(opt: nnx.Optimizer, model) -> None:
    """optax creates the step counts on the default device, and the first step returns them on
    the mesh: the second step would compile again. Put them there from the start."""
    meshes = [x.sharding.mesh for x in jax.tree.leaves(nnx.state(model, nnx.Param))
              if isinstance(x.sharding, NamedSharding)]
    if not meshes:
        return
    replicated = NamedSharding(meshes[0], PartitionSpec())

    def put(x):
        return x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated)
    nnx.update(opt, jax.tree.map(put, nnx.state(opt)))


def trainable_filter(trainable: str):
    parts = {"llm": ("llm",), "llm+projector": ("llm", "mm_projector"),
             "all": ("llm", "mm_projector", "vision_tower")}[trainable]
    return nnx.All(nnx.Param, nnx.Any(*[nnx.PathContains(p) for p in parts]))

