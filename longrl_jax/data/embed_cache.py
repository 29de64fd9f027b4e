"""On-disk cache of video embeddings (the projector output of MR-SP stage 1).

The key covers everything the embedding depends on: the video's identity (resolved path, size,
mtime), the sampling (frame count or fps, cap, size) and a fingerprint of the vision tower and
projector weights. An entry whose key differs is a miss; an entry that fails to load or whose
stored metadata disagrees with the key is recomputed. Files are written to a temporary name and
renamed, so a crash never leaves a half-written entry that looks complete. Long-RL keyed by path
only and silently reused embeddings of the wrong length; this cache cannot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable

import jax
import numpy as np
from flax import nnx

from longrl_jax.data.frames import Sampling

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def weights_fingerprint(model) -> str:
    """sha256 over the vision tower's and projector's parameters (paths, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for part in ("vision_tower", "mm_projector"):
        module = getattr(model, part, None)
        if module is None:
            raise ValueError("the model has no vision tower: nothing to cache")
        for path, var in sorted(nnx.to_flat_state(nnx.state(module, nnx.Param)),
                                key=lambda kv: str(kv[0])):
            arr = np.asarray(jax.device_get(var[...]))
            h.update(f"{part}.{path}:{arr.dtype}:{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:32]


def video_identity(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class EmbedCache:
    def __init__(self, cache_dir: str, fingerprint: str):
        self.dir = cache_dir
        self.fingerprint = fingerprint
        os.makedirs(cache_dir, exist_ok=True)

    def key(self, video_path: str, sampling: Sampling) -> tuple[str, dict]:
        meta = {"format": FORMAT_VERSION, "video": video_identity(video_path),
                "sampling": sampling.key(), "weights": self.fingerprint}
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
        return digest, meta

    def _paths(self, digest: str) -> tuple[str, str]:
        base = os.path.join(self.dir, digest[:2], digest)
        return base + ".npy", base + ".json"

    def load(self, video_path: str, sampling: Sampling) -> np.ndarray | None:
        """The cached embedding [F, P, D] (memory-mapped), or None on a miss or a bad entry."""
        digest, meta = self.key(video_path, sampling)
        npy, js = self._paths(digest)
        if not (os.path.exists(npy) and os.path.exists(js)):
            return None
        try:
            with open(js) as f:
                stored = json.load(f)
            arr = np.load(npy, mmap_mode="r")
        except (OSError, ValueError, json.JSONDecodeError) as e:
            log.warning("cache entry %s is corrupt (%s); recomputing", digest, e)
            return None
        if stored.get("key") != meta or list(arr.shape) != stored.get("shape"):
            log.warning("cache entry %s does not match its key; recomputing", digest)
            return None
        return arr

    def store(self, video_path: str, sampling: Sampling, embeds: np.ndarray,
              frame_indices: np.ndarray | None = None) -> str:
        digest, meta = self.key(video_path, sampling)
        npy, js = self._paths(digest)
        os.makedirs(os.path.dirname(npy), exist_ok=True)
        tmp = f"{npy}.tmp{os.getpid()}.npy"
        np.save(tmp, np.asarray(embeds))
        os.replace(tmp, npy)
        info = {"key": meta, "shape": list(embeds.shape), "dtype": str(embeds.dtype),
                "frame_indices": None if frame_indices is None else
                np.asarray(frame_indices).tolist()}
        with open(f"{js}.tmp{os.getpid()}", "w") as f:
            json.dump(info, f)
        os.replace(f"{js}.tmp{os.getpid()}", js)
        return digest

    def get_or_compute(self, video_path: str, sampling: Sampling,
                       compute: Callable[[], tuple[np.ndarray, np.ndarray]]
                       ) -> tuple[np.ndarray, str]:
        """(embeddings, "cached" | "computed"). `compute` returns (embeds, frame indices)."""
        hit = self.load(video_path, sampling)
        if hit is not None:
            return hit, "cached"
        embeds, idx = compute()
        self.store(video_path, sampling, embeds, idx)
        return np.asarray(embeds), "computed"
