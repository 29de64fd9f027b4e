"""M-RoPE positions from `models/positions.py` equal vLLM's own (`get_mrope_input_positions`,
the engine that samples the rollouts) for the same prompt and grid, response included, and equal
transformers' `get_rope_index` wherever the two references agree. LongVILA gets 1-D positions."""

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig

from longrl_jax.models import positions

VIDEO = 9


def _vllm_positions(ids, starts, grids, secs, tokens_per_second, response_length):
    """vLLM 0.32's Qwen2.5-VL positions: its model method on a prompt whose videos are given as
    the multimodal features its processor would attach (offset = first video token)."""
    from vllm.model_executor.layers.rotary_embedding.mrope import MRotaryEmbedding
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from vllm.multimodal.inputs import (
        MultiModalBatchedField,
        MultiModalFeatureSpec,
        MultiModalFieldElem,
        MultiModalKwargsItem,
        PlaceholderRange,
    )

    model = object.__new__(Qwen2_5_VLForConditionalGeneration)   # the method needs only config
    model.config = Qwen2_5_VLConfig(vision_config={"tokens_per_second": tokens_per_second,
                                                   "spatial_merge_size": 2})
    feats = []
    for i, (start, grid, sec) in enumerate(zip(starts, grids, secs)):
        field = MultiModalBatchedField()
        data = {"video_grid_thw": MultiModalFieldElem(torch.tensor(grid), field)}
        if sec is not None:
            data["second_per_grid_ts"] = MultiModalFieldElem(torch.tensor(sec, dtype=torch.float64),
                                                             field)
        n = grid[0] * grid[1] * grid[2] // 4
        feats.append(MultiModalFeatureSpec(data=MultiModalKwargsItem(data), modality="video",
                                           identifier=f"v{i}",
                                           mm_position=PlaceholderRange(offset=start, length=n)))
    pos, delta = model.get_mrope_input_positions(list(ids), feats)
    nxt = MRotaryEmbedding.get_next_input_positions(delta, len(ids), len(ids) + response_length)
    return np.concatenate([pos.numpy(), np.asarray(nxt, np.int64).reshape(3, -1)], axis=1)


def _layout(pieces):
    """ids and video_rows from [('text', n) | ('video', (t, h, w))] pieces; video starts."""
    ids, rows, starts, row = [], [], [], 0
    for kind, what in pieces:
        if kind == "text":
            ids += [1] * what
            rows += [-1] * what
        else:
            n = what[0] * what[1] * what[2] // 4
            starts.append(len(ids))
            ids += [VIDEO] * n
            rows += list(range(row, row + n))
            row += n
    return np.asarray(ids), np.asarray(rows), starts


CASES = {
    "one_video_step_1": ([("text", 5), ("video", (3, 6, 10)), ("text", 7)], [0.5], 2),
    "temporal_past_spatial": ([("text", 3), ("video", (5, 4, 6)), ("text", 4)], [2.0], 2),
    "two_videos_fractional_step": ([("text", 4), ("video", (3, 8, 4)), ("text", 2),
                                    ("video", (2, 4, 4)), ("text", 6)], [0.7, 1.3], 2),
    "video_first_and_last": ([("video", (4, 4, 8)), ("text", 3), ("video", (1, 6, 6))],
                             [None, 0.25], 2),
    "tokens_per_second_3": ([("text", 2), ("video", (7, 6, 4)), ("text", 5)], [0.35], 3),
    "default_seconds": ([("text", 6), ("video", (2, 10, 2)), ("text", 1)], [None], 4),
    "text_only": ([("text", 9)], [], 2),
    # 0.7 s x 2 = 1.4 per temporal patch: products like 5 x 1.4 sit at an integer, where the
    # truncation depends on the exact float arithmetic.
    "long_fractional_step": ([("text", 2), ("video", (16, 2, 2)), ("text", 2)], [0.7], 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_positions_equal_vllm(name):
    pieces, secs, tps = CASES[name]
    ids, rows, starts = _layout(pieces)
    grids = [list(w) for k, w in pieces if k == "video"]
    ours = positions.prompt_positions(
        rows, video_grid_thw=grids if grids else np.zeros((0, 3)),
        second_per_grid_ts=None if all(s is None for s in secs) else
        [1.0 if s is None else s for s in secs],
        tokens_per_second=tps, response_length=6)
    ref = _vllm_positions(ids, starts, grids, secs, tps, response_length=6)
    assert ours.shape == ref.shape == (3, len(ids) + 6)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(positions.continuation(ours[:, :len(ids)], 6),
                                  ours[:, len(ids):])


def _hf_positions(ids, grids, secs, tps):
    from transformers import Qwen2_5_VLModel
    model = object.__new__(Qwen2_5_VLModel)
    model.config = Qwen2_5_VLConfig(vision_config={"tokens_per_second": tps,
                                                   "spatial_merge_size": 2})
    types = torch.tensor((ids == VIDEO) * 2)[None]
    pos, _ = Qwen2_5_VLModel.get_rope_index(model, torch.tensor(ids)[None], types,
                                            video_grid_thw=torch.tensor(grids),
                                            second_per_grid_ts=torch.tensor(secs))
    return pos[:, 0].numpy()


def test_positions_equal_transformers_where_they_agree():
    """transformers resumes text after a video at start + max(h, w); the original scheme at the
    block's largest position + 1. Equal when (t-1) * step + 1 <= max(h, w); else both are
    computed and shown to differ, so the comparison is not vacuous."""
    rs = np.random.RandomState(0)
    agree = differ = 0
    for _ in range(40):
        pieces, grids, secs = [("text", int(rs.randint(0, 5)))], [], []
        for _ in range(rs.randint(1, 3)):
            g = (int(rs.randint(1, 6)), 2 * int(rs.randint(1, 5)), 2 * int(rs.randint(1, 5)))
            pieces += [("video", g), ("text", int(rs.randint(1, 5)))]
            grids.append(list(g))
            secs.append(float(rs.choice([0.5, 1.0, 1.5])))
        ids, rows, _ = _layout(pieces)
        ours = positions.prompt_positions(rows, video_grid_thw=grids, second_per_grid_ts=secs,
                                          tokens_per_second=2)
        ref = _hf_positions(ids, grids, secs, 2)
        both_agree = all((t - 1) * int(2 * s) + 1 <= max(h, w) // 2
                         for (t, h, w), s in zip(grids, secs))
        if both_agree:
            np.testing.assert_array_equal(ours, ref)
            agree += 1
        elif not np.array_equal(ours, ref):
            differ += 1
    assert agree >= 10 and differ >= 5


def test_longvila_positions_are_1d():
    rows = np.array([-1, -1, 0, 1, 2, 3, -1, -1])
    np.testing.assert_array_equal(positions.prompt_positions(rows, response_length=3),
                                  np.arange(11))
    np.testing.assert_array_equal(positions.continuation(np.arange(8), 2), [8, 9])


def test_bad_layouts_are_named():
    rows = np.array([-1, 0, 1, -1, 2, 3])   # one 2x4 video's 2 rows... split in two
    with pytest.raises(ValueError, match="not one contiguous"):
        positions.prompt_positions(rows, video_grid_thw=[[1, 4, 4]], tokens_per_second=2)
    with pytest.raises(ValueError, match="past the"):
        positions.prompt_positions(np.array([-1, 0, 1, 2, 3, 4]), video_grid_thw=[[1, 4, 4]],
                                   tokens_per_second=2)
    with pytest.raises(ValueError, match="divisible by the spatial merge size"):
        positions.prompt_positions(np.array([0, 1]), video_grid_thw=[[1, 3, 4]],
                                   tokens_per_second=2)
    with pytest.raises(ValueError, match="2 second_per_grid_ts for 1 videos"):
        positions.prompt_positions(np.array([0, 1, 2, 3]), video_grid_thw=[[1, 4, 4]],
                                   second_per_grid_ts=[1, 2], tokens_per_second=2)
