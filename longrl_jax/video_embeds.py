"""Video embeddings for training and rollout: decoded once, encoded with MR-SP stage 1, cached.

The cache key (video identity + sampling + vision-weights fingerprint) doubles as the key under
which the rollout server stores the rows, so a video is sent to the server once per run.
"""

from __future__ import annotations

import logging

import numpy as np

from longrl_jax.data.embed_cache import EmbedCache, weights_fingerprint
from longrl_jax.data.video import Sampling, VideoError, load_frames
from longrl_jax.parallel import video as video_lib

log = logging.getLogger(__name__)


def sampling_of(config, image_size: int, num_frames: int = 0) -> Sampling:
    """`num_frames` > 0 overrides the config's frame count (a stage that uses fewer frames)."""
    d = config.data
    if num_frames:
        return Sampling(num_frames=num_frames, size=image_size)
    return Sampling(num_frames=d.num_frames, fps=d.fps, max_frames=d.max_frames, size=image_size)


class VideoEmbedder:
    def __init__(self, model, mesh, config, cache_dir: str, rules, num_frames: int = 0):
        self.model = model
        self.mesh = mesh
        self.rules = rules
        self.frames_per_chunk = config.sp.frames_per_chunk
        self.decode_batch = config.data.decode_batch
        self.sampling = sampling_of(config, model.cfg.vision.image_size, num_frames)
        self.cache = EmbedCache(cache_dir, weights_fingerprint(model))
        self._memory: dict[str, tuple[str, np.ndarray]] = {}
        self.computed = self.cached = 0
        self.failed: dict[str, str] = {}

    def __call__(self, path: str) -> tuple[str, np.ndarray]:
        """(key, [F, tokens_per_frame, D] float32); raises VideoError for an unusable video."""
        if path in self.failed:
            raise VideoError(self.failed[path])
        if path in self._memory:
            return self._memory[path]

        def compute():
            frames, idx = load_frames(path, self.sampling, batch_frames=self.decode_batch)
            out = video_lib.encode_video_sharded(self.model, frames, mesh=self.mesh,
                                                 frames_per_chunk=self.frames_per_chunk,
                                                 rules=self.rules)
            return np.asarray(out, np.float32), idx

        try:
            embeds, how = self.cache.get_or_compute(path, self.sampling, compute)
        except VideoError as e:
            self.failed[path] = str(e)
            log.warning("skipping video %s: %s", path, e)
            raise
        self.computed += how == "computed"
        self.cached += how == "cached"
        key = self.cache.key(path, self.sampling)[0]
        self._memory[path] = (key, np.asarray(embeds, np.float32))
        return self._memory[path]

    def frames(self, path: str) -> np.ndarray:
        return load_frames(path, self.sampling, batch_frames=self.decode_batch)[0]
