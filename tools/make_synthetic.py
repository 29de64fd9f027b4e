"""Generates the synthetic long-video reasoning suite (the embedded default dataset).

  python tools/make_synthetic.py --out=/tmp/syn --num_train=200 --num_eval=40 --num_frames=64
      [--seed=0] [--size=64] [--fps=8] [--open_ended_fraction=0.2] [--tokenizer]

Writes OUT/train.jsonl, OUT/eval.jsonl (LongVideo-Reason rows), OUT/videos/*.mp4 (H.264), and
with --tokenizer a Qwen2-compatible tokenizer for the tiny model in OUT/tokenizer/.
"""

import json

from absl import app, flags

from longrl_jax.data import synthetic

OUT = flags.DEFINE_string("out", None, "output directory", required=True)
NUM_TRAIN = flags.DEFINE_integer("num_train", 200, "training questions")
NUM_EVAL = flags.DEFINE_integer("num_eval", 40, "held-out questions")
NUM_FRAMES = flags.DEFINE_integer("num_frames", 64, "frames per video")
SEED = flags.DEFINE_integer("seed", 0, "random seed (the suite is deterministic for it)")
SIZE = flags.DEFINE_integer("size", 64, "frame width and height in pixels")
FPS = flags.DEFINE_float("fps", 8.0, "frames per second of the written videos")
OPEN_ENDED = flags.DEFINE_float("open_ended_fraction", 0.0, "share of open-ended questions")
OPTIONS = flags.DEFINE_enum("options", "shuffled", ["shuffled", "ordered"],
                            "option order (see longrl_jax/data/synthetic.py)")
SAMPLE_FRAMES = flags.DEFINE_integer("sample_frames", None,
                                     "frames the model will sample per video (events last long "
                                     "enough to be seen); default: all")
TOKENIZER = flags.DEFINE_bool("tokenizer", False, "also write OUT/tokenizer for the tiny model")


def main(argv):
    del argv
    if NUM_FRAMES.value < 16:
        raise app.UsageError("--num_frames must be at least 16 (events need room)")
    counts = synthetic.generate(OUT.value, num_train=NUM_TRAIN.value, num_eval=NUM_EVAL.value,
                                num_frames=NUM_FRAMES.value, seed=SEED.value, size=SIZE.value,
                                fps=FPS.value, open_ended_fraction=OPEN_ENDED.value,
                                tokenizer=TOKENIZER.value, sample_frames=SAMPLE_FRAMES.value,
                                options=OPTIONS.value)
    print(json.dumps({"out": OUT.value, "counts": counts}))


if __name__ == "__main__":
    app.run(main)
