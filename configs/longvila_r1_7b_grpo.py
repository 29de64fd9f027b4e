"""GRPO on LongVILA-R1-7B with Long-RL's defaults, 256 frames per video
(docs/REFERENCE.md, "GRPO defaults").

  python -m longrl_jax.main --config=configs/longvila_r1_7b_grpo.py \
      --workdir=runs/longvila_r1_7b_grpo \
      --config.model.checkpoint=/path/to/LongVILA-R1-7B \
      --config.dataset.train=/data/longvideo_reason/train.jsonl \
      --config.dataset.eval=/data/longvideo_reason/eval.jsonl \
      --config.dataset.video_dir=/data/longvideo_reason/videos \
      --config.dataset.tokenizer=/path/to/LongVILA-R1-7B/llm

Needs a GPU/TPU mesh (8x80 GB: fsdp over hosts' devices, sequence 4; MR-SP ring attention) and a
rollout server (started on the same host, or `--config.rollout.address=host:port`). Expected:
the paper's LongVideo-Reason-eval overall accuracy rises from the CoT-SFT checkpoint's towards
72.0 (paper, Table 3) over about 1k steps; we have not run it at this scale.
`:runlocal` shrinks everything to a CPU smoke run of the same code path (tiny preset).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
    runlocal = arg == "runlocal"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ("rl", "eval", "export")
    c.thinking = True
    c.model = common.model_config(
        "tiny" if runlocal else "longvila_r1_7b",
        # float32 master weights and Adam state, bfloat16 compute: at lr 1e-6 an update is
        # ~1e-6 of a weight, far below bfloat16's resolution (2^-8), so bf16 weights would
        # round every update away.
        param_dtype="float32",
        dtype="float32" if runlocal else "bfloat16",
        scan_layers=not runlocal, remat=not runlocal, attention="dense" if runlocal else "flash",
        mlp_chunk=0 if runlocal else 8192)
    c.mesh = common.mesh_config(fsdp=-1, sequence=1 if runlocal else 4)
    c.sharding_rules = common.sharding_rules()
    c.sp = common.sp_config(strategy="ring", layout="zigzag", frames_per_chunk=16)
    c.data = common.data_config(num_frames=16 if runlocal else 256)
    if runlocal:
        c.dataset = common.synthetic_dataset(num_train=32, num_eval=8, video_frames=48)
    else:
        c.dataset = common.jsonl_dataset(train="", eval="", video_dir="", tokenizer="")
    c.sft = common.sft_config(steps=0, batch_size=1, lr=1e-5)
    c.rl = common.rl_config(
        steps=2 if runlocal else 1000, prompts_per_step=8 if runlocal else 128,
        group_size=8, lr=1e-6, max_response_tokens=64 if runlocal else 2048,
        temperature=1.0, top_p=0.99, clip_low=0.2, clip_high=0.3, clip_dual=3.0,
        kl_coef=0.01, kl_type="low_var_kl", kl_in="loss", loss_agg="token-mean",
        minibatch_size=32 if runlocal else 128, micro_batch_size=1, logprob_micro_batch_size=1,
        video_on_host=not runlocal,     # the step's other mini-batches' rows wait in host memory
        eval_every=0 if runlocal else 50,
        checkpoint_every=1 if runlocal else 10)
    c.eval = common.eval_config(num_examples=8 if runlocal else 0,
                                max_tokens=64 if runlocal else 2048,
                                temperature=0.0 if runlocal else 0.5)   # Long-RL validates at 0.5
    c.rollout = common.rollout_config(max_model_len=512 if runlocal else 70000,
                                      dtype="float32" if runlocal else "bfloat16",
                                      kvcache_gib=1 if runlocal else 40)
    c.judge = common.judge_config()
    c.distributed = common.distributed_config()
    return c
