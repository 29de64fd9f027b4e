"""Every shipped config (and its CPU variant) loads and validates; config switches take effect."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from longrl_jax import build, config_check

CONFIGS = [("demo", None), ("demo", "quick"), ("longvila_r1_7b_grpo", None),
           ("longvila_r1_7b_grpo", "runlocal"), ("longvila_r1_7b_sft", None),
           ("longvila_r1_7b_sft", "runlocal"), ("qwen2_1_5b_grpo", None),
           ("qwen2_1_5b_grpo", "runlocal")]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_shipped_configs_validate(name, arg):
    c = importlib.import_module(f"configs.{name}").get_config(arg)
    errors = config_check.validate(c)
    if c.dataset.kind == "jsonl" and not c.dataset.train:
        # the full-scale configs take their data paths on the command line (see docstrings)
        assert sorted(errors) == sorted(f"config.dataset.{f}: required for a jsonl dataset"
                                        for f in ("train", "eval", "video_dir", "tokenizer"))
        for f in ("train", "eval", "video_dir", "tokenizer"):
            c.dataset[f] = "/given/on/the/command/line"
        errors = config_check.validate(c)
    assert errors == []
    assert "Expected" in importlib.import_module(f"configs.{name}").__doc__


def test_flash_attention_switch_gives_the_dense_numbers():
    from configs import demo
    out = {}
    for attention in ("dense", "flash"):
        c = demo.get_config("quick")
        c.model.attention = attention
        model, _ = build.build_model(c, video_token_id=3, separator_token_id=4)
        ids = jnp.asarray(np.random.default_rng(0).integers(5, 600, size=(2, 96)))
        out[attention] = np.asarray(model.llm(ids))
    np.testing.assert_allclose(out["flash"], out["dense"], atol=1e-5, rtol=1e-5)


def test_init_std_rescales_random_weights_only():
    from configs import demo
    c = demo.get_config("quick")
    c.model.init_std = 0.1
    model, _ = build.build_model(c, video_token_id=3, separator_token_id=4)
    q = np.asarray(model.llm.layers[0].self_attn.q_proj.kernel[...])
    assert abs(q.std() - 0.1) < 0.01
    assert np.all(np.asarray(model.llm.norm.scale[...]) == 1.0)
    assert np.all(np.asarray(model.llm.layers[0].self_attn.q_proj.bias[...]) == 0.0)


def test_sp_layout_zigzag_is_accepted_with_a_sequence_axis():
    c = importlib.import_module("configs.demo").get_config(None)
    c.mesh.update(fsdp=2, sequence=4)
    c.sp.layout = "zigzag"
    assert not [e for e in config_check.validate(c) if e.startswith("config.sp.")]
    c.sp.layout = "striped"
    assert [e for e in config_check.validate(c) if e.startswith("config.sp.layout")]
