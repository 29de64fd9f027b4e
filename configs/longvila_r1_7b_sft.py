"""CoT-SFT of LongVILA-R1-7B on LongVideo-Reason reasoning traces (the paper's first stage).

  python -m longrl_jax.main --config=configs/longvila_r1_7b_sft.py \
      --workdir=runs/longvila_r1_7b_sft \
      --config.model.checkpoint=/path/to/LongVILA-7B \
      --config.dataset.train=/data/longvideo_reason/sft.jsonl \
      --config.dataset.eval=/data/longvideo_reason/eval.jsonl \
      --config.dataset.video_dir=/data/longvideo_reason/videos \
      --config.dataset.tokenizer=/path/to/LongVILA-7B/llm

The vision tower stays frozen (cached embeddings); the LLM trains with MR-SP ring attention over
the 'sequence' axis. Expected: the format rate reaches ~1.0 within a few hundred steps and
accuracy rises above the base model's; not run at this scale by us. `:runlocal` is a CPU smoke
run of the same code path.
"""


from configs import common, longvila_r1_7b_grpo


def get_config(arg: str | None = None):
    runlocal = arg == "runlocal"
    c = longvila_r1_7b_grpo.get_config(arg)
    c.stages = ("sft", "eval", "export")
    c.sft = common.sft_config(steps=4 if runlocal else 3000, batch_size=4 if runlocal else 64,
                              lr=1e-3 if runlocal else 1e-5, warmup_steps=0 if runlocal else 100,
                              max_response_tokens=64 if runlocal else 2048,
                              checkpoint_every=2 if runlocal else 200)
    return c
