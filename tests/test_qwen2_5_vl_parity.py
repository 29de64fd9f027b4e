"""Qwen2.5-VL against transformers' `Qwen2_5_VLForConditionalGeneration` in float32, random weights
moved off their init: the vision tower at 1e-4, one decoder layer at 1e-5, full logits with a
video at 1e-4; odd configs (GQA groups 1 and 3, tied and untied head, windows that do not divide
the patch grid, an odd number of temporal patches, two videos of different sizes)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import qwen2_5_vl_hf, rel_err, video_inputs

from longrl_jax.models import hf, positions, qwen2_5_vl
from longrl_jax.models.layers import dense_attention

CONFIGS = {
    # GQA group 1, untied; window 56 px = 2x2 merged units; full attention at block 1 of 3.
    "mha_untied_window2": dict(hidden=64, heads=4, kv=4, tied=False, window=56, fullatt=(1,)),
    # GQA group 3, tied; window 112 px = 4x4 units; full attention at blocks 0 and 2; 3 vision
    # heads; head_dim 16 with sections (2, 3, 3).
    "gqa3_tied_window4": dict(hidden=96, inter=72, heads=6, kv=2, tied=True, window=112,
                              fullatt=(0, 2), v_hidden=48, v_heads=3, v_inter=56, layers=3),
}
# (t, h, w) in patches: 3 temporal patches (odd), a 6 x 10 grid = 3 x 5 merged units, which
# neither window size divides; a second, smaller video.
GRIDS = [[3, 6, 10], [1, 4, 4]]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch_model = qwen2_5_vl_hf(**CONFIGS[request.param])
    d = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(d)
    return torch_model, hf.load_pretrained(str(d))


def _prompt(cfg, grids, rs, lead=5, mid=4, tail=6):
    """Processor-style ids: text, <vision_start> video pads <vision_end> per video, text."""
    vocab_text = cfg.vision_start_token_id
    ids = list(rs.randint(0, vocab_text, lead))
    for t, h, w in grids:
        ids += [cfg.vision_start_token_id] + [cfg.video_token_id] * (t * h * w // 4)
        ids += [cfg.vision_end_token_id] + list(rs.randint(0, vocab_text, mid))
    return np.asarray(ids + list(rs.randint(0, vocab_text, tail)), np.int64)


def test_vision_tower_matches(pair):
    torch_model, model = pair
    pv, grid = video_inputs(torch_model, GRIDS, seed=1)
    with torch.no_grad():
        ref = torch_model.model.visual(pv, grid_thw=grid).pooler_output.numpy()
    out = np.asarray(qwen2_5_vl.video_rows(model.vision_tower, pv.numpy(), grid.numpy()))
    assert out.shape == ref.shape == (sum(t * h * w for t, h, w in GRIDS) // 4,
                                      model.cfg.llm.hidden_size)
    assert rel_err(out, ref) < 1e-4


def test_encode_video_from_frames_matches_patches(pair):
    """`encode_video` on frames equals the tower on the same frames cut by transformers' own
    video processor (`Qwen2VLVideoProcessor.patchify`: an odd frame count repeats the last)."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    _, model = pair
    frames = np.random.RandomState(4).randn(5, 56, 84, 3).astype(np.float32)
    ours = np.asarray(model.encode_video(frames))
    assert ours.shape == (3, 2 * 3, model.cfg.llm.hidden_size)
    video = torch.tensor(frames.transpose(0, 3, 1, 2))[None]          # [1, T, C, H, W]
    patches, t, h, w = Qwen2VLVideoProcessor().patchify(video, patch_size=14, merge_size=2,
                                                         temporal_patch_size=2)
    assert (t, h, w) == (3, 4, 6)
    ref = np.asarray(qwen2_5_vl.video_rows(model.vision_tower, patches[0].numpy(), [[t, h, w]]))
    np.testing.assert_array_equal(ours.reshape(-1, ours.shape[-1]), ref)


def test_one_decoder_layer_matches_at_1e5(pair):
    torch_model, model = pair
    cfg = torch_model.config.text_config
    rs = np.random.RandomState(3)
    x = rs.randn(2, 11, cfg.hidden_size).astype(np.float32)
    pos = np.sort(rs.randint(0, 40, (3, 2, 11)), axis=-1)     # three distinct rows
    lm = torch_model.model.language_model
    cos, sin = lm.rotary_emb(torch.tensor(x), torch.tensor(pos))
    with torch.no_grad():
        ref = lm.layers[1](torch.tensor(x), attention_mask=None,
                           position_embeddings=(cos, sin))
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    c, s = model.llm.rope(jnp.asarray(pos))
    out = model.llm.layers[1](jnp.asarray(x), c, s, None, dense_attention)
    assert rel_err(out, ref) < 1e-5


def _hf_logits(torch_model, ids, pv, grid, **kw):
    with torch.no_grad():
        return torch_model(input_ids=torch.tensor(ids), pixel_values_videos=pv,
                           video_grid_thw=grid, **kw).logits.numpy()


def test_logits_with_videos_where_references_agree(pair):
    """Grids whose temporal positions stay below the spatial ones: transformers builds its own
    positions (`mm_token_type_ids`), and they equal ours."""
    torch_model, model = pair
    cfg = model.cfg
    rs = np.random.RandomState(5)
    ids = _prompt(cfg, GRIDS, rs)[None]
    pv, grid = video_inputs(torch_model, GRIDS, seed=2)
    secs = [0.5, 1.0]   # x tokens_per_second 2: temporal step 1 and 2, below max(h, w) = 5
    types = torch.tensor((ids == cfg.video_token_id) * 2)
    hf_pos, _ = torch_model.model.get_rope_index(torch.tensor(ids), types, video_grid_thw=grid,
                                                 second_per_grid_ts=torch.tensor(secs))
    ours_pos = qwen2_5_vl.batch_positions(
        ids, None, video_token_id=cfg.video_token_id, video_grid_thw=grid.numpy(),
        second_per_grid_ts=secs, tokens_per_second=cfg.vision.tokens_per_second,
        spatial_merge_size=2)
    np.testing.assert_array_equal(ours_pos, hf_pos.numpy())
    ref = _hf_logits(torch_model, ids, pv, grid, mm_token_type_ids=types,
                     second_per_grid_ts=torch.tensor(secs))
    out = np.asarray(model.hf_logits(ids, pixel_values_videos=pv.numpy(),
                                     video_grid_thw=grid.numpy(), second_per_grid_ts=secs))
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4


def test_logits_with_videos_where_references_differ(pair):
    """A video whose scaled temporal positions pass its width: transformers' `get_rope_index`
    resumes the text elsewhere than the original scheme (checked, so this case is real), and
    given our positions transformers' logits equal ours. Batch of two with left padding."""
    torch_model, model = pair
    cfg = model.cfg
    rs = np.random.RandomState(6)
    grids = [GRIDS[0]]
    a, b = _prompt(cfg, grids, rs), _prompt(cfg, grids, rs, lead=2, tail=3)
    ids = np.stack([a, np.concatenate([np.zeros(len(a) - len(b), np.int64), b])])
    mask = np.ones_like(ids)
    mask[1, :len(a) - len(b)] = 0
    pv, grid = video_inputs(torch_model, grids * 2, seed=3)
    secs = [2.0, 2.0]   # temporal step 4: positions 0, 4, 8 > width 5
    types = torch.tensor((ids == cfg.video_token_id) * 2)
    hf_pos, _ = torch_model.model.get_rope_index(
        torch.tensor(ids), types, video_grid_thw=grid, second_per_grid_ts=torch.tensor(secs),
        attention_mask=torch.tensor(mask))
    ours_pos = qwen2_5_vl.batch_positions(
        ids, mask, video_token_id=cfg.video_token_id, video_grid_thw=grid.numpy(),
        second_per_grid_ts=secs, tokens_per_second=cfg.vision.tokens_per_second,
        spatial_merge_size=2)
    valid = mask.astype(bool)
    assert not np.array_equal(ours_pos[:, valid], hf_pos.numpy()[:, valid])
    ref = _hf_logits(torch_model, ids, pv, grid, attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(ours_pos))
    out = np.asarray(model.hf_logits(ids, pixel_values_videos=pv.numpy(),
                                     video_grid_thw=grid.numpy(), attention_mask=mask,
                                     second_per_grid_ts=secs))
    assert rel_err(out[valid], ref[valid]) < 1e-4


def test_text_only_logits_match(pair):
    torch_model, model = pair
    ids = np.random.RandomState(7).randint(0, 120, (2, 13))
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids)).logits.numpy()
    assert rel_err(np.asarray(model.hf_logits(ids)), ref) < 1e-4
    assert rel_err(np.asarray(model.llm(jnp.asarray(ids))), ref) < 1e-4


def test_bad_inputs_are_named(pair):
    torch_model, model = pair
    cfg = model.cfg
    ids = _prompt(cfg, GRIDS[:1], np.random.RandomState(8))[None]
    pv, grid = video_inputs(torch_model, GRIDS[:1])
    with pytest.raises(ValueError, match="no pixel_values_videos"):
        model.hf_logits(ids)
    with pytest.raises(ValueError, match="do not match video_grid_thw"):
        model.hf_logits(ids, pixel_values_videos=pv.numpy()[1:], video_grid_thw=grid.numpy())
    with pytest.raises(ValueError, match="video tokens"):
        model.hf_logits(ids[:, 3:-3][:, :-20], pixel_values_videos=pv.numpy(),
                        video_grid_thw=grid.numpy())
    with pytest.raises(ValueError, match="multiples of 28"):
        model.encode_video(np.zeros((2, 30, 56, 3), np.float32))
    with pytest.raises(ValueError, match="tokens_per_second is required"):
        positions.prompt_positions([-1, 0, 1, 2, 3], video_grid_thw=[[1, 4, 4]])


def test_hf_logits_on_the_longvila_family_is_its_llm(tmp_path):
    """One interface on both families: an LLM-only (LongVILA-family) checkpoint's `hf_logits`
    equals transformers' Qwen2 on the same ids and mask; frames are refused by name."""
    from hf_fixtures import qwen2_hf
    torch_model = qwen2_hf(seed=5)
    torch_model.save_pretrained(tmp_path)
    model = hf.load_pretrained(str(tmp_path))
    ids = np.random.RandomState(9).randint(0, 97, (2, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(model.hf_logits(ids, attention_mask=mask))
    assert rel_err(out[mask.astype(bool)], ref[mask.astype(bool)]) < 1e-4
    with pytest.raises(NotImplementedError, match="Qwen2.5-VL only"):
        model.hf_logits(ids, pixel_values_videos=np.zeros((4, 3)), video_grid_thw=[[1, 2, 2]])
