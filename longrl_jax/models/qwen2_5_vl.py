"""Qwen2.5-VL glue between the tower, the positions and the M-RoPE LLM: frames -> video rows, and
`hf_logits` (transformers' processor outputs -> the logits its model returns).

The pieces live in `qwen2_5_vl_vision.py` (the tower), `qwen2.py` (the decoder, M-RoPE through
`LLMConfig.mrope_section`) and `positions.py` (the [3, T] positions); `vlm.VLM` holds them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longrl_jax.models import positions as positions_lib
from longrl_jax.models.qwen2_5_vl_vision import (
    Qwen25VisionModel,
    patchify,
    unflatten_pixel_values,
)


def encode_frames(tower: Qwen25VisionModel, frames_fhwc) -> jax.Array:
    """Normalised frames [F, H, W, C] (H, W multiples of 28) -> rows [Tp, (H/28)*(W/28), D], one
    block per temporal patch of 2 frames (an odd F repeats its last frame)."""
    patches, (_, h, w) = patchify(frames_fhwc, tower.cfg)
    return tower(jnp.asarray(patches), (h, w))


def video_rows(tower: Qwen25VisionModel, pixel_values_videos, video_grid_thw) -> jax.Array:
    """transformers' `pixel_values_videos` + `video_grid_thw` -> the rows of all videos in order
    [sum t*h*w/4, D], as its `get_video_features` concatenates them."""
    out = []
    for patches, (_, h, w) in zip(unflatten_pixel_values(pixel_values_videos, video_grid_thw,
                                                         tower.cfg),
                                  np.asarray(video_grid_thw).reshape(-1, 3)):
        rows = tower(jnp.asarray(patches), (int(h), int(w)))
        out.append(rows.reshape(-1, rows.shape[-1]))
    return jnp.concatenate(out, axis=0)


def batch_positions(input_ids_bt: np.ndarray, attention_mask_bt: np.ndarray | None, *,
                    video_token_id: int, video_grid_thw, second_per_grid_ts,
                    tokens_per_second: float, spatial_merge_size: int) -> np.ndarray:
    """[3, B, T] positions of a processor batch: each row's videos take the next grids in order
    (as transformers assigns them); padded tokens (mask 0) get 0."""
    b, t = input_ids_bt.shape
    mask = np.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
    grids = np.zeros((0, 3), np.int64) if video_grid_thw is None else \
        np.asarray(video_grid_thw, np.int64).reshape(-1, 3)
    secs = np.ones(len(grids)) if second_per_grid_ts is None else \
        np.asarray(second_per_grid_ts, np.float64).reshape(-1)
    sizes = grids.prod(-1) // spatial_merge_size ** 2
    out = np.zeros((3, b, t), np.int64)
    g = 0
    for i in range(b):
        ids = input_ids_bt[i][mask[i]]
        n = int(np.sum(ids == video_token_id))
        first = g
        while n > 0 and g < len(grids):
            n -= int(sizes[g])
            g += 1
        if n != 0:
            raise ValueError(f"row {i}: its video tokens do not match the next video_grid_thw "
                             "entries")
        rows = positions_lib.video_rows_from_ids(ids, video_token_id)
        if g > first:
            pos = positions_lib.prompt_positions(
                rows, video_grid_thw=grids[first:g], second_per_grid_ts=secs[first:g],
                tokens_per_second=tokens_per_second, spatial_merge_size=spatial_merge_size)
        else:
            pos = np.broadcast_to(np.arange(len(ids)), (3, len(ids)))
        out[:, i, mask[i]] = pos
    if g != len(grids):
        raise ValueError(f"{len(grids)} video_grid_thw entries for {g} videos in input_ids")
    return out


def hf_logits(model, input_ids, *, pixel_values_videos=None, video_grid_thw=None,
              attention_mask=None, second_per_grid_ts=None) -> jax.Array:
    """Logits [B, T, V] for transformers' processor outputs: `input_ids` with every video
    expanded to t*h*w/4 `<|video_pad|>` tokens, its `pixel_values_videos` and `video_grid_thw`.

    Positions follow the original M-RoPE scheme (`models/positions.py`), as vLLM does; they equal
    transformers' own `get_rope_index` wherever the two references agree, and elsewhere this
    equals transformers given these positions as `position_ids`."""
    cfg = model.cfg
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got {ids.shape}")
    mask = None if attention_mask is None else np.asarray(attention_mask)
    x_btd = model.llm.embed(jnp.asarray(ids))
    is_video = ids == cfg.video_token_id
    if pixel_values_videos is not None:
        if video_grid_thw is None:
            raise ValueError("pixel_values_videos needs video_grid_thw")
        rows_nd = video_rows(model.vision_tower, pixel_values_videos, video_grid_thw)
        if rows_nd.shape[0] != int(is_video.sum()):
            raise ValueError(f"{int(is_video.sum())} video tokens in input_ids for "
                             f"{rows_nd.shape[0]} video rows")
        rows_bt = np.where(is_video, np.cumsum(is_video.reshape(-1)).reshape(ids.shape) - 1, 0)
        x_btd = jnp.where(jnp.asarray(is_video)[..., None],
                          rows_nd.astype(x_btd.dtype)[jnp.asarray(rows_bt)], x_btd)
    elif is_video.any():
        raise ValueError("input_ids hold video tokens but no pixel_values_videos were given")
    pos = batch_positions(ids, mask, video_token_id=cfg.video_token_id,
                          video_grid_thw=video_grid_thw if pixel_values_videos is not None else None,
                          second_per_grid_ts=second_per_grid_ts,
                          tokens_per_second=cfg.vision.tokens_per_second,
                          spatial_merge_size=cfg.vision.spatial_merge_size)
    return model.llm(inputs_embeds_btd=x_btd, positions_bt=jnp.asarray(pos),
                     attention_mask_bt=None if mask is None else jnp.asarray(mask))
