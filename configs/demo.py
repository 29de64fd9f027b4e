"""The embedded default job: tiny VLM, synthetic long-video suite, CPU-sized.

  make demo
  # = python -m longrl_jax.main --config=configs/demo.py --workdir=runs/demo

Generates the synthetic suite, runs CoT-SFT on part of it, then GRPO with a rollout server the
trainer starts, evaluates after each stage on held-out questions, exports to runs/demo/export/
and writes runs/demo/eval_summary.json and runs/demo/plot.png. `:quick` is a smoke-sized run.
Expected (2 CPU cores, about 15 minutes): see README "Demo results".
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
    quick = arg == "quick"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ("sft", "rl", "eval", "export")
    c.thinking = True
    c.model = ml_collections.ConfigDict(dict(preset="tiny", vocab_size=640, checkpoint="",
                                             param_dtype="float32", dtype="float32"))
    c.model.video_token_id = -1          # -1: the tokenizer's <video> and "\n" ids
    c.model.separator_token_id = -1
    c.model.scan_layers = False
    c.model.remat = False
    c.mesh = common.mesh_config()
    c.sharding_rules = common.sharding_rules()
    c.sp = common.sp_config(layout="contiguous")
    c.num_frames = 16
    c.data = common.data_config(num_frames=16)
    c.dataset = common.synthetic_dataset(num_train=48 if quick else 480,
                                         num_eval=16 if quick else 120, video_frames=48)
    c.sft = common.sft_config(steps=4 if quick else 150, batch_size=16, lr=2e-3,
                              num_examples=32 if quick else 240, max_response_tokens=64,
                              warmup_steps=10, checkpoint_every=50)
    c.rl = common.rl_config(steps=2 if quick else 40, prompts_per_step=8, group_size=8, lr=2e-4,
                            max_response_tokens=64, top_p=1.0, minibatch_size=32,
                            eval_every=0 if quick else 10, checkpoint_every=5)
    c.eval = common.eval_config(num_examples=16 if quick else 120, max_tokens=64)
    c.rollout = common.rollout_config(max_model_len=512, dtype="float32", block_size=32,
                                      kvcache_gib=1)
    c.judge = common.judge_config()
    return c
