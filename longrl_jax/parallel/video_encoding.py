"""MR-SP stage 1: the frames of one video encoded in parallel across devices.

Frames are padded to a multiple of the devices on the frame axes (never truncated), split over
them, and each device encodes its frames `frames_per_chunk` at a time, so the activation memory
of the vision tower is bounded by one chunk whatever the video length. The result [F, P, D] is
unpadded before it is returned. With a `preprocess` function (the family's image processor as
jnp, e.g. `models.siglip.FramePreprocess`), the frames cross to the devices as uint8 at their
native size and each chunk is resized and normalised on the device that encodes it.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longrl_jax.models.vlm import VLM
from longrl_jax.parallel import mesh as mesh_lib


def frame_axes(mesh, rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes of the 'frames' logical axis (config rules), those of size > 1."""
    target = dict(rules).get("frames") or ()
    axes = (target,) if isinstance(target, str) else tuple(target)
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def encode_video_sharded(model: VLM, frames_fhwc: jax.Array, *, mesh,
                         frames_per_chunk: int = 8,
                         rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES,
                         preprocess: Callable[[jax.Array], jax.Array] | None = None
                         ) -> jax.Array:
    """[F, H, W, C] frames -> [F, tokens_per_frame, D], frames sharded over the 'frames' rule's
    mesh axes (data, fsdp, sequence by default). Frames are normalised at the model's size, or
    whatever `preprocess` (hashable: compiled encoders are cached by it) takes."""
    if frames_per_chunk <= 0:
        raise ValueError("frames_per_chunk must be positive")
    axes = frame_axes(mesh, rules)
    n_dev = math.prod(mesh.shape[a] for a in axes) if axes else 1
    f = frames_fhwc.shape[0]
    per_dev = -(-f // n_dev)
    chunk = min(frames_per_chunk, per_dev)
    per_dev = -(-per_dev // chunk) * chunk
    pad = per_dev * n_dev - f
    xp = np if isinstance(frames_fhwc, np.ndarray) else jnp  # pad host frames on the host
    frames = xp.pad(frames_fhwc, ((0, pad), (0, 0), (0, 0), (0, 0))) if pad else frames_fhwc
    spec = P(axes or None)
    frames = jax.device_put(frames, NamedSharding(mesh, spec))
    graphdef, state = nnx.split(model)
    out = _encode(graphdef, state, frames, mesh, spec, chunk, preprocess)
    return out[:f]


def _encode(graphdef, state, frames, mesh, spec, chunk, preprocess=None):
    return _encoder(graphdef, mesh, spec, chunk, preprocess)(state, frames)


@functools.lru_cache(maxsize=32)
def _encoder(graphdef, mesh, spec, chunk, preprocess):
    """One compiled encoder per model structure, mesh, chunking and preprocessing (not one per
    call)."""
    @jax.jit
    def run(state, frames):
        def local(state, frames):
            model = nnx.merge(graphdef, state)
            chunks = frames.reshape((-1, chunk) + frames.shape[1:])

            def encode(chunk_fhwc):
                if preprocess is not None:
                    chunk_fhwc = preprocess(chunk_fhwc)
                return model.encode_video(chunk_fhwc)

            out = jax.lax.map(encode, chunks)
            return out.reshape((-1,) + out.shape[2:])
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), spec), out_specs=spec,
                             check_vma=False)(state, frames)
    return run


__all__ = ["encode_video_sharded", "frame_axes"]
