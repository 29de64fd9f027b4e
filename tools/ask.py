"""Asks a trained policy a question about a video; prints its reasoning and its answer.

  python tools/ask.py --checkpoint=runs/demo/export --video=runs/demo/data/videos/eval_000003.mp4 \
      --question="Which appeared first in the video?" --options=red,blue,green,white
  python tools/ask.py --workdir=runs/demo --video=clip.mp4 --question="What happens at the end?"

`--workdir` takes a run's newest policy, `--checkpoint` an HF export or a LongVILA / Qwen
checkpoint. The video is sampled (`--num_frames` or `--fps`), embedded by the policy's vision
tower and answered by the rollout server started from the policy (`--rollout_address`: a running
one); `--options` makes it a multiple-choice question (options lettered A, B, ...).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

WORKDIR = flags.DEFINE_string("workdir", None, "a training run's --workdir (its newest policy)")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "an HF export or LongVILA/Qwen checkpoint")
VIDEO = flags.DEFINE_string("video", None, "the video file", required=True)
QUESTION = flags.DEFINE_string("question", None, "the question", required=True)
OPTIONS = flags.DEFINE_list("options", None, "answer options (comma-separated): multiple choice")
NUM_FRAMES = flags.DEFINE_integer("num_frames", 16, "frames per video, uniform")
FPS = flags.DEFINE_float("fps", None, "frames per second instead of --num_frames")
MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "cap on the frames --fps samples")
THINKING = flags.DEFINE_boolean("thinking", True, "ask for <think> reasoning before the answer")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy)")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", 512, "response length cap")
ROLLOUT_ADDRESS = flags.DEFINE_string("rollout_address", None, "a running rollout server")


def main(argv):
    del argv
    from longrl_jax.answerer import VideoQA
    if bool(WORKDIR.value) == bool(CHECKPOINT.value):
        raise SystemExit("ask: give exactly one of --workdir and --checkpoint")
    if not os.path.isfile(VIDEO.value):
        raise SystemExit(f"ask: --video {VIDEO.value}: no such file")
    try:
        qa = VideoQA(workdir=WORKDIR.value, checkpoint=CHECKPOINT.value,
                     num_frames=NUM_FRAMES.value, fps=FPS.value, max_frames=MAX_FRAMES.value,
                     thinking=THINKING.value, max_tokens=MAX_TOKENS.value,
                     temperature=TEMPERATURE.value, rollout_address=ROLLOUT_ADDRESS.value or "")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"ask: {e}") from None
    with qa:
        try:
            got = qa.ask(VIDEO.value, QUESTION.value, OPTIONS.value)
        except ValueError as e:
            raise SystemExit(f"ask: {e}") from None
    print(f"Question: {got.problem}\n")
    print(f"Reasoning: {got.reasoning or '(none)'}\n")
    print(f"Answer: {got.answer}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
