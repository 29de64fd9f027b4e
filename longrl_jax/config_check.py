"""Config validation: every problem is found before any work starts, named by its field.

The allowed values come from the modules that own them (the estimators, KL kinds and loss
aggregations from `rl.algorithms`, SP strategies from `parallel.sequence`, ...); the defaults
are in `configs/common.py`. Only the stage names are owned here.
"""

from __future__ import annotations

from longrl_jax.build import ATTENTION
from longrl_jax.data.prepare import DATASET_KINDS
from longrl_jax.data.synthetic import OPTION_ORDERS, TRACES
from longrl_jax.optim import TRAINABLE
from longrl_jax.parallel.sequence import LAYOUTS as SP_LAYOUTS
from longrl_jax.parallel.sequence import STRATEGIES as SP_STRATEGIES
from longrl_jax.rl.algorithms import AGG_MODES as AGGS
from longrl_jax.rl.algorithms import ESTIMATORS
from longrl_jax.rl.algorithms import KL_KINDS as KL_TYPES
from longrl_jax.rl.process_connection import SERVER_PER

STAGES = ("sft", "rl", "eval", "export")      # in the order a run does them
ALGORITHMS = tuple(ESTIMATORS)
TRAINABLE_PARTS = tuple(TRAINABLE)


def validate(c) -> list[str]:
    """Problems as 'config.<field>: <why>' lines; empty when the config is usable."""
    errs: list[str] = []

    def need(ok: bool, field: str, why: str):
        if not ok:
            errs.append(f"config.{field}: {why}")

    bad = [s for s in c.stages if s not in STAGES]
    need(not bad, "stages", f"unknown stage(s) {bad}; choose from {STAGES}")
    _check_data(c, need)
    _check_model(c, need)
    if "sft" in c.stages:
        _check_sft(c.sft, need)
    if "rl" in c.stages:
        _check_rl(c.rl, need)
        need(c.rl.max_response_tokens < c.rollout.max_model_len, "rollout.max_model_len",
             "must exceed rl.max_response_tokens plus the prompt")
    if {"rl", "eval"} & set(c.stages):
        need(c.rollout.dtype in ("float32", "bfloat16", "float16"), "rollout.dtype",
             "float32, bfloat16 or float16")
        need(c.eval.max_tokens > 0, "eval.max_tokens", "must be positive")
        need(c.rollout.max_attempts >= 1, "rollout.max_attempts", "must be >= 1")
        need(c.rollout.get("server_per", "host") in SERVER_PER, "rollout.server_per",
             " or ".join(SERVER_PER))
    if "distributed" in c:
        _check_distributed(c.distributed, need)
    return errs


def _check_distributed(d, need) -> None:
    """HOST:PORT of process 0, and a process id inside the count (absl overrides arrive as
    strings and ints exactly as typed)."""
    if d.coordinator:
        host, _, port = d.coordinator.rpartition(":")
        need(bool(host) and port.isdigit() and 0 < int(port) < 65536, "distributed.coordinator",
             f"{d.coordinator!r} is not HOST:PORT")
        need(d.num_processes >= 1, "distributed.num_processes", "must be >= 1")
        need(0 <= d.process_id < max(d.num_processes, 1), "distributed.process_id",
             f"must be in [0, num_processes={d.num_processes})")
    ids = str(d.local_device_ids).replace(" ", "")
    need(not ids or all(i.isdigit() for i in ids.split(",")), "distributed.local_device_ids",
         f"{d.local_device_ids!r} is not a comma-separated list of device ids")
    need(d.heartbeat_timeout_s >= 2, "distributed.heartbeat_timeout_s", "must be >= 2")


def _check_data(c, need) -> None:
    need(c.dataset.kind in DATASET_KINDS, "dataset.kind", " or ".join(DATASET_KINDS))
    if c.dataset.kind == "jsonl":
        for f in ("train", "eval", "video_dir", "tokenizer"):
            need(bool(c.dataset[f]), f"dataset.{f}", "required for a jsonl dataset")
    else:
        s = c.dataset.synthetic
        need(s.num_train > 0, "dataset.synthetic.num_train", "must be positive")
        need(s.num_eval > 0, "dataset.synthetic.num_eval", "must be positive")
        need(s.video_frames >= 8, "dataset.synthetic.video_frames", "must be >= 8")
        need(s.options in OPTION_ORDERS, "dataset.synthetic.options", " or ".join(OPTION_ORDERS))
        need(s.distractors or s.options == "ordered",
             "dataset.synthetic.distractors", "False needs dataset.synthetic.options='ordered'")
        need(s.traces in TRACES and (s.traces == "frames" or s.options == "ordered"),
             "dataset.synthetic.traces", "'frames', or 'brief' with options='ordered'")
    need((c.data.num_frames is None) != (c.data.fps is None), "data.num_frames",
         "set exactly one of data.num_frames and data.fps")


def _check_model(c, need) -> None:
    need(c.model.init_std > 0, "model.init_std", "must be positive")
    need(c.model.attention in ATTENTION, "model.attention", " or ".join(ATTENTION))
    need(c.model.mlp_chunk >= 0, "model.mlp_chunk", "must be >= 0 (0: the whole MLP at once)")
    need(c.model.remat or not c.model.remat_offload, "model.remat_offload",
         "offloads what rematerialisation saves: set model.remat too")
    need(c.sp.strategy in SP_STRATEGIES, "sp.strategy",
         f"unknown SP strategy {c.sp.strategy!r}; choose from {SP_STRATEGIES}")
    need(c.sp.layout in SP_LAYOUTS, "sp.layout",
         f"unknown sequence layout {c.sp.layout!r}; choose from {SP_LAYOUTS}")


def _check_sft(s, need) -> None:
    need(s.steps >= 0, "sft.steps", "must be >= 0")
    need(s.batch_size > 0, "sft.batch_size", "must be positive")
    need(s.max_response_tokens > 0, "sft.max_response_tokens", "must be positive")
    need(s.trainable in TRAINABLE, "sft.trainable", f"one of {TRAINABLE_PARTS}")
    need(s.num_frames >= 0, "sft.num_frames", "must be >= 0 (0: data.num_frames)")
    need(s.micro_batch_size >= 0, "sft.micro_batch_size", "must be >= 0 (0: the whole batch)")
    need(s.optimizer.lr > 0, "sft.optimizer.lr", "must be positive")
    need(s.checkpoint_every > 0, "sft.checkpoint_every", "must be positive")


def _check_rl(r, need) -> None:
    need(r.algorithm in ALGORITHMS, "rl.algorithm", f"one of {ALGORITHMS}")
    need(r.steps >= 0, "rl.steps", "must be >= 0")
    need(r.prompts_per_step > 0, "rl.prompts_per_step", "must be positive")
    need(r.group_size >= 2, "rl.group_size", "GRPO needs at least 2 samples per prompt")
    need(r.max_response_tokens > 0, "rl.max_response_tokens", "must be positive")
    need(0 < r.top_p <= 1, "rl.top_p", "must be in (0, 1]")
    need(r.temperature > 0, "rl.temperature", "must be positive for sampling")
    need(r.clip_low > 0 and r.clip_high > 0, "rl.clip_low", "clip ranges must be positive")
    need(not r.clip_dual or r.clip_dual > 1, "rl.clip_dual", "must be > 1 (or 0: off)")
    need(r.loss_agg in AGGS, "rl.loss_agg", f"one of {AGGS}")
    need(r.kl_type in KL_TYPES, "rl.kl_type", f"one of {KL_TYPES}")
    need(r.kl_in in ("loss", "reward"), "rl.kl_in", "loss or reward")
    need(r.kl_coef >= 0, "rl.kl_coef", "must be >= 0")
    total = r.prompts_per_step * r.group_size
    need(0 < r.minibatch_size <= total and total % r.minibatch_size == 0,
         "rl.minibatch_size", f"must divide prompts_per_step * group_size = {total}")
    need(r.ppo_epochs >= 1, "rl.ppo_epochs", "must be >= 1")
    need(r.micro_batch_size >= 0, "rl.micro_batch_size", "must be >= 0 (0: a whole mini-batch)")
    need(r.logprob_micro_batch_size >= 0, "rl.logprob_micro_batch_size",
         "must be >= 0 (0: all sequences at once)")
    need(r.optimizer.lr > 0, "rl.optimizer.lr", "must be positive")
    need(r.checkpoint_every > 0, "rl.checkpoint_every", "must be positive")
