"""Qwen2.5-VL checkpoints: HF -> JAX -> HF writes the input tensors back unchanged, from both name
layouts (the hub's / transformers 5's `visual.*`, `model.layers.*`; transformers 4.52-4.x's
`model.visual.*`, `model.language_model.*`); the export is what transformers 5 writes and loads
in transformers with identical logits; presets and configs."""

import json

import numpy as np
import pytest
import torch
from hf_fixtures import qwen2_5_vl_hf, video_inputs, write_transformers4_layout
from transformers import Qwen2_5_VLForConditionalGeneration

from longrl_jax.models import ModelConfig, hf
from longrl_jax.models.config import ConfigError


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _logits(model, cfg, grids=((3, 6, 10),)):
    pv, grid = video_inputs(model, [list(g) for g in grids], seed=5)
    n = sum(t * h * w for t, h, w in grids) // 4
    ids = [1, 2, cfg.vision_start_token_id] + [cfg.video_token_id] * n + [
        cfg.vision_end_token_id, 3, 4, 5]
    types = torch.tensor([[2 if i == cfg.video_token_id else 0 for i in ids]])
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values_videos=pv, video_grid_thw=grid,
                     mm_token_type_ids=types).logits.numpy()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
def test_roundtrip_both_layouts(tmp_path, layout, tied):
    src = qwen2_5_vl_hf(tied=tied, seed=2)
    if layout == "transformers5":
        src.save_pretrained(tmp_path / "src")
    else:
        write_transformers4_layout(src, str(tmp_path / "src"))
    model = hf.load_pretrained(str(tmp_path / "src"))
    assert model.cfg.family == "qwen2_5_vl" and (model.llm.lm_head is None) == tied
    hf.save_pretrained(model, str(tmp_path / "out"))

    # What transformers 5 itself writes for the source model, tensor for tensor.
    src.save_pretrained(tmp_path / "ref")
    ref = hf.read_tensors(str(tmp_path / "ref"))
    if tied:
        ref.pop("lm_head.weight", None)
    _assert_same(ref, hf.read_tensors(str(tmp_path / "out")))
    if layout == "transformers4":   # the input's own tensors, under their new names
        renamed = {k.replace("model.visual.", "visual.").replace("model.language_model.",
                                                                  "model."): v
                   for k, v in hf.read_tensors(str(tmp_path / "src")).items()}
        _assert_same(renamed, hf.read_tensors(str(tmp_path / "out")))
    # The export loads in transformers (our config.json) with identical logits.
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out",
                                                              dtype=torch.float32).eval()
    np.testing.assert_array_equal(_logits(back, model.cfg), _logits(src, model.cfg))
    again = ModelConfig.from_qwen2_5_vl_hf(json.load(open(tmp_path / "out" / "config.json")))
    assert again == model.cfg


def test_weight_sync_names_are_the_export_names(tmp_path):
    src = qwen2_5_vl_hf(seed=3)
    src.save_pretrained(tmp_path / "src")
    model = hf.load_pretrained(str(tmp_path / "src"))
    llm = hf.hf_arrays(model, "llm")
    tower = hf.hf_arrays(model, "vision_tower")
    assert all(k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head."))
               for k in llm)
    assert all(k.startswith("visual.") for k in tower)
    _assert_same({**llm, **tower}, hf.read_tensors(str(tmp_path / "src")))
    with pytest.raises(ValueError, match="no part 'mm_projector'"):
        hf.hf_arrays(model, "mm_projector")


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import save_file
    src = qwen2_5_vl_hf(seed=4)
    src.save_pretrained(tmp_path / "src")
    sd = {k: v.contiguous() for k, v in src.state_dict().items()
          if "blocks.1.attn.qkv.weight" not in k}
    save_file(sd, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"missing tensor 'blocks\.1\.attn\.qkv\.weight'"):
        hf.load_pretrained(str(tmp_path / "src"))


def test_invalid_configs_are_named():
    cfg = ModelConfig.qwen2_5_vl_tiny()
    with pytest.raises(ConfigError, match="out_hidden_size"):
        cfg.replace(vision=cfg.vision.__class__(**{**cfg.vision.__dict__,
                                                   "out_hidden_size": 32}))
    with pytest.raises(ConfigError, match="mrope_section"):
        cfg.llm.__class__(**{**cfg.llm.__dict__, "mrope_section": (4, 6, 4)})
    with pytest.raises(ConfigError, match="window_size"):
        cfg.vision.__class__(**{**cfg.vision.__dict__, "window_size": 100})
    with pytest.raises(ConfigError, match="fullatt_block_indexes"):
        cfg.vision.__class__(**{**cfg.vision.__dict__, "fullatt_block_indexes": (5,)})
    with pytest.raises(ConfigError, match="no fixed tokens_per_frame"):
        _ = cfg.tokens_per_frame
