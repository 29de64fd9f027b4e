"""Toy sequence batches for the step tests: a 5-token prompt around one 4-frame video of
4 tokens per frame (video id 3, separator id 4, D = 64), and responses of given lengths."""

import numpy as np

from longrl_jax import batch as batch_lib
from longrl_jax import prompts as prompts_lib
from longrl_jax.models.splice import splice_layout

VIDEO_ID, SEP_ID = 3, 4


def toy_batch(lengths, *, seed=0, row_scale=0.02, num_videos=None, length_multiple=64,
              frames=4):
    """A `SequenceBatch` of len(lengths) rows; `num_videos` distinct videos shared round-robin
    (default: one per row), of `frames` frames each."""
    rng = np.random.default_rng(seed)
    ids = [10, 11, VIDEO_ID, 12, 13]
    lay = splice_layout(ids, video_token_id=VIDEO_ID, frames_per_video=[frames],
                        tokens_per_frame=4, separator_id=SEP_ID)
    prompts = []
    for i in range(len(lengths)):
        rows = rng.normal(size=(4 * frames, 64)).astype(np.float32) * row_scale
        prompts.append(prompts_lib.Prompt(None, np.array(ids), lay,
                                          f"v{i % (num_videos or len(lengths))}", rows))
    responses = [rng.integers(20, 60, size=n).astype(np.int32) for n in lengths]
    return batch_lib.build_batch(prompts, responses, response_len=8,
                                 length_multiple=length_multiple)
