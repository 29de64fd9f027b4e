"""The embedded default job: tiny VLM, synthetic long-video suite, CPU-sized.

  make demo
  # = python -m longrl_jax.main --config=configs/demo.py --workdir=runs/demo

Generates the synthetic suite, runs CoT-SFT on part of it, then GRPO with a rollout server the
trainer starts, evaluates after each stage on held-out questions, exports to runs/demo/export/
and writes runs/demo/eval_summary.json and runs/demo/plot.png. `:quick` is a smoke-sized run.

The recipe is the paper's at toy scale: CoT-SFT on short clips (8 frames per video, the first
600 training questions), then RL on long inputs (32 frames, all 1,200 questions), evaluated at
32 frames after each stage. The SFT policy has only seen 8-frame inputs: at 32 frames its
accuracy falls to chance and its format breaks. GRPO, trained at the length it is evaluated at,
recovers the format and reads the longer inputs, so RL is well above SFT: what MR-SP exists
for. A 2-layer model trained from scratch cannot learn the suite's two-step questions in
minutes, so the demo uses the suite's one-step variant: options in a fixed order, no
distractor objects, brief reasoning traces (longrl_jax/data/synthetic.py explains each).

Expected: RL accuracy well above SFT's, in minutes on 2 CPU cores; the run time and accuracies
measured so far are in README "Demo results".
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
    quick = arg == "quick"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ("sft", "rl", "eval", "export")
    c.thinking = True
    # init_std: fan-in sized for width 64, which learns far faster than 0.02.
    c.model = common.model_config("tiny", init_std=0.1)
    c.mesh = common.mesh_config()
    c.sharding_rules = common.sharding_rules()
    c.sp = common.sp_config(layout="contiguous")
    c.data = common.data_config(num_frames=32)   # RL and evaluation; SFT uses sft.num_frames
    c.dataset = common.synthetic_dataset(num_train=48 if quick else 1200,
                                         num_eval=16 if quick else 120, video_frames=48,
                                         options="ordered", distractors=False,
                                         traces="brief")
    c.sft = common.sft_config(steps=4 if quick else 1500, batch_size=32, lr=2e-3,
                              num_examples=32 if quick else 600, max_response_tokens=64,
                              warmup_steps=10, checkpoint_every=250, num_frames=8)
    c.rl = common.rl_config(steps=2 if quick else 100, prompts_per_step=16, group_size=8, lr=5e-4,
                            max_response_tokens=64, top_p=1.0, minibatch_size=64,
                            dynamic_sampling=True, max_refills=3,
                            eval_every=0 if quick else 20, checkpoint_every=10)
    c.eval = common.eval_config(num_examples=16 if quick else 120, max_tokens=64)
    c.rollout = common.rollout_config(max_model_len=512, dtype="float32", block_size=32,
                                      kvcache_gib=1)
    c.judge = common.judge_config()
    c.distributed = common.distributed_config()
    return c
