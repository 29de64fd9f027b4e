"""A wrong or incomplete checkpoint fails with an error that names the tensor, field or file."""

import json
import os
import shutil

import pytest
from hf_fixtures import projector_torch, qwen2_hf, siglip_hf, write_longvila
from safetensors.torch import load_file, save_file

from longrl_jax.models import hf
from longrl_jax.models.config import ConfigError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    qwen2_hf().save_pretrained(d)
    return d


@pytest.fixture
def ckpt(good, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    return d


def _edit_tensors(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(d, fn):
    cfg = json.load(open(d / "config.json"))
    fn(cfg)
    json.dump(cfg, open(d / "config.json", "w"))


def test_missing_tensor_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"):
        hf.load_pretrained(str(ckpt))


def test_wrong_shape_is_named(ckpt):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
    _edit_tensors(ckpt, shrink)
    with pytest.raises(hf.CheckpointError,
                       match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*shape \(8, 48\)"):
        hf.load_pretrained(str(ckpt))


def test_config_disagreeing_with_tensors_is_named(ckpt):
    _edit_config(ckpt, lambda c: c.update(intermediate_size=96))
    with pytest.raises(hf.CheckpointError, match=r"gate_proj\.weight.*\(80, 48\).*\(96, 48\)"):
        hf.load_pretrained(str(ckpt))


def test_unknown_architecture_is_named(ckpt):
    _edit_config(ckpt, lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]))
    with pytest.raises(ConfigError, match=r"unknown LLM architecture.*llama"):
        hf.load_pretrained(str(ckpt))


def test_missing_config_field_is_named(ckpt):
    _edit_config(ckpt, lambda c: c.pop("num_attention_heads"))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        hf.load_pretrained(str(ckpt))


def test_unsupported_rope_type_is_named(ckpt):
    _edit_config(ckpt, lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                           "rope_theta": 1e6}))
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        hf.load_pretrained(str(ckpt))


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(hf.CheckpointError, match="does not exist"):
        hf.load_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.CheckpointError, match="no config.json"):
        hf.load_pretrained(str(tmp_path / "empty"))


def test_missing_and_truncated_shards(ckpt):
    os.rename(ckpt / "model.safetensors", ckpt / "hidden.bin")
    with pytest.raises(hf.CheckpointError, match=r"no \*\.safetensors files"):
        hf.load_pretrained(str(ckpt))
    data = open(ckpt / "hidden.bin", "rb").read()
    open(ckpt / "model.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(hf.CheckpointError, match="truncated"):
        hf.load_pretrained(str(ckpt))
    json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}},
              open(ckpt / "model.safetensors.index.json", "w"))
    with pytest.raises(hf.CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        hf.load_pretrained(str(ckpt))


def test_vlm_missing_projector_tensor_and_bad_projector_type(tmp_path):
    tower, llm = siglip_hf(head=False), qwen2_hf(hidden=40, heads=4, kv=2, inter=48, vocab=64)
    write_longvila(str(tmp_path), llm, tower, projector_torch(tower.config.hidden_size, 40))
    pdir = tmp_path / "mm_projector"
    t = load_file(str(pdir / "model.safetensors"))
    t.pop("mm_projector.layers.4.bias")
    save_file(t, str(pdir / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=r"missing tensor 'layers\.4\.bias'"):
        hf.load_pretrained(str(tmp_path))
    json.dump({"mm_projector_type": "mlp_downsample_3x3_fix"}, open(pdir / "config.json", "w"))
    with pytest.raises(ConfigError, match="mlp_downsample_3x3_fix"):
        hf.load_pretrained(str(tmp_path))
    json.dump({"model_type": "clip_vision_model"}, open(tmp_path / "vision_tower" / "config.json",
                                                         "w"))
    with pytest.raises(ConfigError, match="clip_vision_model"):
        hf.load_pretrained(str(tmp_path))
