"""Where a video goes in a prompt: one layout used by the rollout prompt and the trainer prefill.

A prompt's token ids hold one placeholder id per video. Each placeholder expands to the video's
frames, `tokens_per_frame` embedding rows each, followed by one separator token (the "\\n" id) per
frame. The layout is plain NumPy (the rollout side imports no JAX): `token_ids` holds the text and
separator ids (0 at video rows), `video_rows` the row of the concatenated video embeddings for
video positions and -1 elsewhere.

The layout is computed once, here, and both sides follow it, so they condition on the same
sequence; they do not splice with the same code. The trainer splices on the device
(`VLM.splice`: `splice_embeddings`, one `where` over the whole sequence). The rollout server
receives `SpliceLayout.segments()` (runs of token ids and ranges of video rows, sent by
`rl/rollout_client.py`) and concatenates, in segment order, the embeddings of each run's token
ids and the stored video rows of each range (`rollout_server/service.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpliceLayout:
    token_ids: np.ndarray   # [T] int32
    video_rows: np.ndarray  # [T] int32, -1 for text and separators

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def is_video(self) -> np.ndarray:
        return self.video_rows >= 0

    def segments(self) -> list[tuple[str, np.ndarray | tuple[int, int]]]:
        """Runs of ('ids', ids) and ('video', (first_row, end_row)), in order: what a server
        that splices by reference needs."""
        out: list[tuple[str, np.ndarray | tuple[int, int]]] = []
        start = 0
        vid = self.is_video
        for i in range(1, self.length + 1):
            if i == self.length or vid[i] != vid[start] or (
                    vid[i] and self.video_rows[i] != self.video_rows[i - 1] + 1):
                if vid[start]:
                    out.append(("video", (int(self.video_rows[start]),
                                          int(self.video_rows[i - 1]) + 1)))
                else:
                    out.append(("ids", self.token_ids[start:i].copy()))
                start = i
        return out


def splice_layout(prompt_ids: Sequence[int], *, video_token_id: int,
                  frames_per_video: Sequence[int], tokens_per_frame: int,
                  separator_id: int | None) -> SpliceLayout:
    ids = np.asarray(prompt_ids, dtype=np.int32)
    where = np.flatnonzero(ids == video_token_id)
    if len(where) != len(frames_per_video):
        raise ValueError(f"the prompt has {len(where)} video placeholder(s) (id {video_token_id})"
                         f" but {len(frames_per_video)} video(s) were given")
    tok, rows = [], []
    prev, row = 0, 0
    per_frame_sep = 1 if separator_id is not None else 0
    for pos, nf in zip(where, frames_per_video):
        tok.append(ids[prev:pos])
        rows.append(np.full(pos - prev, -1, np.int32))
        frame_tok = np.zeros((nf, tokens_per_frame + per_frame_sep), np.int32)
        frame_rows = np.full((nf, tokens_per_frame + per_frame_sep), -1, np.int32)
        frame_rows[:, :tokens_per_frame] = row + np.arange(nf * tokens_per_frame).reshape(
            nf, tokens_per_frame)
        if per_frame_sep:
            frame_tok[:, -1] = separator_id
        tok.append(frame_tok.reshape(-1))
        rows.append(frame_rows.reshape(-1))
        row += nf * tokens_per_frame
        prev = pos + 1
    tok.append(ids[prev:])
    rows.append(np.full(len(ids) - prev, -1, np.int32))
    return SpliceLayout(np.concatenate(tok).astype(np.int32), np.concatenate(rows))


def splice_embeddings(text_embeds_td, video_rows_nd, video_rows_t, xp=np):
    """Embedding sequence [T, D]: video rows where `video_rows_t >= 0`, text embeddings elsewhere.

    `xp` is the array module (numpy, jax.numpy or torch-like with the same `where`/`take`).
    Works on batched inputs too ([B, T, D] with [B, T] rows).
    """
    is_video = video_rows_t >= 0
    gathered = xp.take(video_rows_nd, xp.where(is_video, video_rows_t, 0), axis=0)
    return xp.where(is_video[..., None], gathered, text_embeds_td)
