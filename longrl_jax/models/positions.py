"""Rotary positions of a prompt and its response, built once on the host from the prompt's layout.

The rollout request and the trainer's prefill both take what `prompt_positions` returns, so the
model sees the same positions when it samples and when it is trained. Plain NumPy: the rollout
side imports no JAX.

LongVILA (1-D RoPE): positions are 0..T-1, the response continues T, T+1, ...

Qwen2.5-VL (M-RoPE, [3, T]: temporal, height, width rows), the ORIGINAL scheme, which vLLM
implements (`Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions`):
  - a text run gets the same sequential positions on all three rows, starting at `st`;
  - a video block of `t x h x w` merged units (row-major: temporal patch, row, column) gets
    `st + (t_index * second_per_grid * tokens_per_second)` (truncated to an integer) on the
    temporal row, `st + row` and `st + column` on the others;
  - `st` for whatever follows a block is the block's LARGEST position over all three rows + 1;
  - generated tokens continue from the largest prompt position + 1 on all three rows.
transformers 5's `get_rope_index` resumes after a video at the block start + max(h, w) instead
(it ignores the temporal extent); the two agree for images and for videos whose scaled temporal
positions stay below the spatial ones, and differ otherwise. The rollout engine (vLLM) follows
the original scheme, and training must condition as the rollout did, so this module does too.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def video_grids(video_grid_thw, spatial_merge_size: int) -> list[tuple[int, int, int]]:
    """transformers' / vLLM's `video_grid_thw` (patch units, [V, 3]) -> merged units per video."""
    grid = np.asarray(video_grid_thw, np.int64).reshape(-1, 3)
    out = []
    for t, h, w in grid.tolist():
        if t <= 0 or h <= 0 or w <= 0 or h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(f"video_grid_thw {[t, h, w]} is not a positive grid divisible by the "
                             f"spatial merge size {spatial_merge_size}")
        out.append((t, h // spatial_merge_size, w // spatial_merge_size))
    return out


def _video_spans(video_rows: np.ndarray, sizes: Sequence[int]) -> list[int]:
    """Start index in the sequence of each video, checking that video v's rows (the next
    `sizes[v]` rows of the table, in order) sit contiguously in the sequence."""
    starts, first = [], 0
    for v, n in enumerate(sizes):
        at = np.flatnonzero((video_rows >= first) & (video_rows < first + n))
        if len(at) != n or (n and (at[-1] - at[0] != n - 1 or
                                   np.any(video_rows[at] != first + np.arange(n)))):
            raise ValueError(f"video {v}: its {n} rows (table rows {first}..{first + n - 1}) are "
                             f"not one contiguous, ordered block of the prompt ({len(at)} found)")
        starts.append(int(at[0]))
        first += n
    if np.any(video_rows >= first):
        raise ValueError(f"the prompt places video rows past the {first} the grids account for")
    return starts


def prompt_positions(video_rows, *, video_grid_thw=None, second_per_grid_ts=None,
                     tokens_per_second: float | None = None, spatial_merge_size: int = 2,
                     response_length: int = 0) -> np.ndarray:
    """Positions of a prompt of `len(video_rows)` tokens followed by `response_length` generated
    tokens: int64 [T + R] without grids (LongVILA, 1-D RoPE), [3, T + R] with them (M-RoPE).

    `video_rows` [T]: for each token its row in the concatenated video embeddings, -1 for text
    (`SpliceLayout.video_rows`; `video_rows_from_ids` for a processor's expanded ids).
    `video_grid_thw` [V, 3] in patch units as transformers and vLLM take it (each video is
    `t * h * w / merge^2` rows); `second_per_grid_ts` [V] seconds per temporal patch (default
    1.0, as both references); `tokens_per_second` from the checkpoint's vision config.

    The temporal index is truncated from a float64 product, as vLLM computes it from the Python
    float it reads back from its `second_per_grid_ts` tensor: send vLLM that tensor in float64
    (a float32 0.7 reads back as 0.69999999, and 5 x 1.4 then truncates to 6, not 7).
    """
    rows = np.asarray(video_rows, np.int64).reshape(-1)
    length = len(rows)
    if response_length < 0:
        raise ValueError(f"response_length must be >= 0, got {response_length}")
    if video_grid_thw is None:
        if second_per_grid_ts is not None:
            raise ValueError("second_per_grid_ts given without video_grid_thw")
        return np.arange(length + response_length, dtype=np.int64)
    if tokens_per_second is None:
        raise ValueError("tokens_per_second is required for M-RoPE positions (read it from the "
                         "checkpoint's vision config)")
    grids = video_grids(video_grid_thw, spatial_merge_size)
    seconds = [1.0] * len(grids) if second_per_grid_ts is None else \
        [float(s) for s in np.asarray(second_per_grid_ts, np.float64).reshape(-1)]
    if len(seconds) != len(grids):
        raise ValueError(f"{len(seconds)} second_per_grid_ts for {len(grids)} videos")
    starts = _video_spans(rows, [t * h * w for t, h, w in grids])

    pos = np.empty((3, length + response_length), np.int64)
    st, cursor = 0, 0      # next text position, next sequence index
    for (t, h, w), start, sec in zip(grids, starts, seconds):
        n_text = start - cursor
        pos[:, cursor:start] = st + np.arange(n_text)
        st += n_text
        tpw = np.indices((t, h, w)).reshape(3, -1)
        t_factor = sec * float(tokens_per_second)
        if t_factor != 1.0:    # vLLM's arithmetic: float64 product, truncated
            tpw[0] = (tpw[0] * t_factor).astype(np.int64)
        block = tpw + st
        pos[:, start:start + t * h * w] = block
        st = int(block.max()) + 1 if block.size else st
        cursor = start + t * h * w
    pos[:, cursor:length] = st + np.arange(length - cursor)
    nxt = int(pos[:, :length].max()) + 1 if length else 0
    pos[:, length:] = nxt + np.arange(response_length)
    return pos


def video_rows_from_ids(input_ids, video_token_id: int) -> np.ndarray:
    """`video_rows` for ids whose videos are already expanded to one `video_token_id` per row
    (transformers' processor output): the k-th video token is row k."""
    ids = np.asarray(input_ids).reshape(-1)
    is_video = ids == video_token_id
    return np.where(is_video, np.cumsum(is_video) - 1, -1).astype(np.int64)


def continuation(positions: np.ndarray, n: int) -> np.ndarray:
    """The next `n` positions after `positions` ([T] or [3, T]): largest + 1 onwards, on every
    row (vLLM's `mrope_position_delta` rule)."""
    nxt = int(np.max(positions)) + 1 if np.size(positions) else 0
    steps = nxt + np.arange(n, dtype=np.int64)
    return steps if np.ndim(positions) == 1 else np.broadcast_to(steps, (3, n)).copy()
