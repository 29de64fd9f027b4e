"""Presets build, and the mapping tables cover every parameter of every preset exactly once."""

import collections

import pytest
from flax import nnx

from longrl_jax.models import VLM, ModelConfig, hf
from longrl_jax.models.config import ConfigError


@pytest.mark.parametrize("name", ["tiny", "qwen2_0_5b", "qwen2_1_5b", "longvila_r1_7b",
                                  "qwen2_5_vl_tiny", "qwen2_5_vl_3b", "qwen2_5_vl_7b"])
def test_tables_cover_each_parameter_once(name):
    cfg = getattr(ModelConfig, name)()
    abstract = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
    params = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(abstract))}
    covered = collections.Counter(p for fam in hf.families_of(cfg)
                                  for paths, _, _ in hf.expand(fam, cfg) for p in paths)
    assert set(covered) == set(params)
    assert max(covered.values()) == 1
    assert all(v.logical_axes is not None and len(v.logical_axes) == len(v.shape)
               for v in params.values())
    n = sum(v.size for v in params.values())
    if name in ("qwen2_5_vl_3b", "qwen2_5_vl_7b"):   # released: a 669M tower; 3.75B / 8.29B
        n_vision = sum(v.size for k, v in params.items() if k.startswith("vision_tower."))
        assert 0.66e9 < n_vision < 0.68e9
        assert (3.7e9 < n < 3.8e9) if name == "qwen2_5_vl_3b" else (8.2e9 < n < 8.35e9)
    # HF shapes implied by the table match transformers' conventions for a few known tensors.
    if name == "longvila_r1_7b":
        assert 7.5e9 < n < 8.5e9
        assert cfg.tokens_per_frame == 256


def test_configs_round_trip_through_hf_json():
    cfg = ModelConfig.longvila_r1_7b()
    again = ModelConfig.from_hf(cfg.llm.to_hf(), cfg.vision.to_hf(), cfg.projector.to_hf(),
                                {"mm_vision_select_layer": -2,
                                 "separator_token_id": cfg.separator_token_id})
    assert again.llm == cfg.llm and again.projector == cfg.projector
    assert again.vision == cfg.vision


def test_invalid_configs_name_the_field():
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ModelConfig.tiny().llm.__class__(vocab_size=8, hidden_size=8, intermediate_size=8,
                                         num_layers=1, num_heads=3, num_kv_heads=2, head_dim=4)
    with pytest.raises(ConfigError, match="image_size"):
        ModelConfig.tiny().vision.__class__(hidden_size=8, intermediate_size=8, num_layers=1,
                                            num_heads=2, image_size=30, patch_size=7)
