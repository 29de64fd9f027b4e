"""Pieces every experiment config shares: the mesh and the logical-axis rules."""

import ml_collections

from longrl_jax.parallel.mesh import DEFAULT_RULES


def mesh_config(data: int = 1, fsdp: int = -1, sequence: int = 1, tensor: int = 1):
    """Mesh axis sizes; -1 = the rest of the devices."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, sequence=sequence, tensor=tensor))


def sharding_rules():
    """Logical axis -> mesh axes, as a tuple of pairs (MaxText-style); edit per experiment."""
    return tuple((name, axes) for name, axes in DEFAULT_RULES)


def sp_config(strategy: str = "ring", layout: str = "zigzag", frames_per_chunk: int = 8,
              gather_chunk_rows: int = 4096):
    """MR-SP: the stage-2 attention strategy and sequence layout (used when mesh.sequence > 1),
    stage 1's frames per encoding chunk, and the chunk of rows for host transfers."""
    return ml_collections.ConfigDict(dict(strategy=strategy, layout=layout,
                                          frames_per_chunk=frames_per_chunk,
                                          gather_chunk_rows=gather_chunk_rows))


def data_config(num_frames: int | None = 16, fps: float | None = None,
                max_frames: int | None = None, decode_batch: int = 32):
    """Frame sampling: `num_frames` uniformly over the video, or `fps` with a `max_frames` cap
    (set num_frames to None); frames are decoded `decode_batch` at a time."""
    return ml_collections.ConfigDict(dict(num_frames=num_frames, fps=fps, max_frames=max_frames,
                                          decode_batch=decode_batch))
