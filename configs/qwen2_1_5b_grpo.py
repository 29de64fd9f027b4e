"""GRPO on a Qwen2-1.5B-sized LLM with a SigLIP tower: the mid-sized recipe between the demo and
LongVILA-R1-7B (fits one 80 GB GPU with fsdp; 64 frames per video).

  python -m longrl_jax.main --config=configs/qwen2_1_5b_grpo.py --workdir=runs/qwen2_1_5b_grpo \
      --config.model.checkpoint=/path/to/longvila_style_1_5b \
      --config.dataset.train=... --config.dataset.eval=... --config.dataset.video_dir=... \
      --config.dataset.tokenizer=/path/to/longvila_style_1_5b/llm

Expected: reward and eval accuracy rise over the first few hundred steps; not run by us at
this scale. `:runlocal` is a CPU smoke run of the same code path.
"""

from configs import longvila_r1_7b_grpo


def get_config(arg: str | None = None):
    runlocal = arg == "runlocal"
    c = longvila_r1_7b_grpo.get_config(arg)
    if not runlocal:
        c.model.preset = "qwen2_1_5b"
        c.mesh.sequence = 1
        c.data.num_frames = 64
        c.rl.prompts_per_step = 32
        c.rl.minibatch_size = 64
        c.rl.optimizer.lr = 2e-6
        c.rollout.max_model_len = 20000
    return c
