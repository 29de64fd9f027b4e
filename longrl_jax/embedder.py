"""Video embeddings for training and rollout: decoded once, encoded with MR-SP stage 1, cached.

The cache key (video identity + sampling + vision-weights fingerprint) doubles as the key under
which the rollout server stores the rows, so a video is sent to the server once per run. Frames
are decoded as uint8 at their native size and resized + normalised inside stage 1 on the devices
by the family's processor (`preprocess`); for SigLIP that equals the host PIL pipeline bit for
bit, so cached embeddings do not depend on where the resize ran.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import numpy as np

from longrl_jax.data.embed_cache import EmbedCache, weights_fingerprint
from longrl_jax.data.frames import Sampling, VideoError, decode_frames
from longrl_jax.models.siglip import FramePreprocess
from longrl_jax.parallel import video_encoding as video_lib

log = logging.getLogger(__name__)


def sampling_of(config, image_size: int, num_frames: int = 0) -> Sampling:
    """`num_frames` > 0 overrides the config's frame count (a stage that uses fewer frames)."""
    d = config.data
    if num_frames:
        return Sampling(num_frames=num_frames, size=image_size)
    return Sampling(num_frames=d.num_frames, fps=d.fps, max_frames=d.max_frames, size=image_size)


class VideoEmbedder:
    """A video path -> (cache key, its rows [F, tokens_per_frame, D]): decoded once, encoded by
    MR-SP stage 1, stored in the on-disk cache. It is the one record of the videos that could not
    be used (`failed`, path -> reason): a failed video is never decoded twice and never replaced
    by another. With `keep_in_memory` (training), rows already seen are served from memory.
    `preprocess`: uint8 frames at native size -> the tower's input, run on the devices
    (hashable); SigLIP's processor by default."""

    def __init__(self, model, mesh, sampling: Sampling, cache_dir: str, *, rules,
                 frames_per_chunk: int, decode_batch: int, keep_in_memory: bool = True,
                 preprocess: Callable[[jax.Array], jax.Array] | None = None):
        self.model = model
        self.mesh = mesh
        self.rules = rules
        self.frames_per_chunk = frames_per_chunk
        self.decode_batch = decode_batch
        self.sampling = sampling
        self.preprocess = preprocess or FramePreprocess(sampling.size)
        self.cache = EmbedCache(cache_dir, weights_fingerprint(model))
        self.keep_in_memory = keep_in_memory
        self._memory: dict[str, tuple[str, np.ndarray]] = {}
        self.computed = self.cached = 0
        self.failed: dict[str, str] = {}
        # With several processes a process encodes its videos on its own devices; chunked as a
        # mesh of this many frame devices would chunk them, each frame is computed in the same
        # shapes, hence to the same bits, whatever the process count.
        self.chunks_like: int | None = None

    @classmethod
    def from_config(cls, model, mesh, config, cache_dir: str, rules, *, num_frames: int = 0,
                    keep_in_memory: bool = True) -> "VideoEmbedder":
        return cls(model, mesh, sampling_of(config, model.cfg.vision.image_size, num_frames),
                   cache_dir, rules=rules, frames_per_chunk=config.sp.frames_per_chunk,
                   decode_batch=config.data.decode_batch, keep_in_memory=keep_in_memory)

    def __call__(self, path: str) -> tuple[str, np.ndarray]:
        """(key, [F, tokens_per_frame, D] float32); raises VideoError for an unusable video."""
        if path in self.failed:
            raise VideoError(self.failed[path])
        if path in self._memory:
            return self._memory[path]

        def compute():
            frames, idx = decode_frames(path, self.sampling, batch_frames=self.decode_batch)
            chunk = self.frames_per_chunk
            if self.chunks_like:
                chunk = min(chunk, -(-len(frames) // self.chunks_like))
            out = video_lib.encode_video_sharded(self.model, frames, mesh=self.mesh,
                                                 frames_per_chunk=chunk, rules=self.rules,
                                                 preprocess=self.preprocess)
            return np.asarray(out, np.float32), idx

        try:
            embeds, how = self.cache.get_or_compute(path, self.sampling, compute)
        except VideoError as e:
            self.failed[path] = str(e)
            log.warning("skipping video %s: %s", path, e)
            raise
        self.computed += how == "computed"
        self.cached += how == "cached"
        out = (self.cache.key(path, self.sampling)[0], np.asarray(embeds, np.float32))
        if self.keep_in_memory:
            self._memory[path] = out
        return out

    def frames(self, path: str) -> np.ndarray:
        """The tower's input for a video (float32 [F, size, size, 3]), for stages that train
        the tower; preprocessed by the same device function as `__call__`."""
        frames = decode_frames(path, self.sampling, batch_frames=self.decode_batch)[0]
        return np.asarray(_preprocess(self.preprocess, frames))


_preprocess = jax.jit(lambda preprocess, frames: preprocess(frames), static_argnums=0)
