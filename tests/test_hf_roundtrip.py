"""HF -> JAX -> HF writes the input tensors back unchanged; exports load in transformers."""

import os

import jax.numpy as jnp
import numpy as np
import torch
from hf_fixtures import projector_torch, qwen2_hf, siglip_hf, write_longvila
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

from longrl_jax.data.tokenizer import build_qwen2_tokenizer
from longrl_jax.models import hf


def _tensors(d):
    return hf.read_tensors(str(d))


def _assert_same_tensors(a, b, strip=()):
    a = {hf._strip(k, strip): v for k, v in a.items()}
    b = {hf._strip(k, strip): v for k, v in b.items()}
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_qwen2_sharded_roundtrip_and_transformers_reload(tmp_path):
    src = qwen2_hf(tied=False)
    src.save_pretrained(tmp_path / "src", max_shard_size="20KB")  # several shards + index
    assert os.path.exists(tmp_path / "src" / "model.safetensors.index.json")
    model = hf.load_pretrained(str(tmp_path / "src"))
    hf.save_pretrained(model, str(tmp_path / "out"))
    _assert_same_tensors(_tensors(tmp_path / "src"), _tensors(tmp_path / "out"))

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor(np.random.RandomState(0).randint(0, 97, (2, 13)))
    np.testing.assert_array_equal(back(ids).logits.detach().numpy(),
                                  src(ids).logits.detach().numpy())


def test_tied_qwen2_roundtrip(tmp_path):
    src = qwen2_hf(tied=True, heads=4, kv=4, hidden=32, inter=64)
    src.save_pretrained(tmp_path / "src")
    model = hf.load_pretrained(str(tmp_path / "src"))
    assert model.llm.lm_head is None
    hf.save_pretrained(model, str(tmp_path / "out"))
    src_t = {k: v for k, v in _tensors(tmp_path / "src").items() if k != "lm_head.weight"}
    _assert_same_tensors(src_t, _tensors(tmp_path / "out"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(back(ids).logits.detach().numpy(),
                                  src(ids).logits.detach().numpy())


def test_longvila_roundtrip(tmp_path):
    tower = siglip_hf(head=True)
    llm = qwen2_hf(hidden=40, heads=4, kv=2, inter=48, vocab=64)
    proj = projector_torch(tower.config.hidden_size, 40)
    write_longvila(str(tmp_path / "src"), llm, tower, proj)
    tok = build_qwen2_tokenizer(["a", "video", "of", "cats"], str(tmp_path / "src" / "llm"))
    ids = tok("a video of cats")["input_ids"]
    assert len(ids) == 4
    model = hf.load_pretrained(str(tmp_path / "src"))
    hf.save_pretrained(model, str(tmp_path / "out"))
    # The tokenizer travels with the LLM, so llm/ alone is a complete model for transformers/vLLM.
    assert AutoTokenizer.from_pretrained(tmp_path / "out" / "llm")("a video of cats")[
        "input_ids"] == ids
    for part, strip in (("llm", ()), ("vision_tower", ()), ("mm_projector", ("mm_projector.",))):
        _assert_same_tensors(_tensors(tmp_path / "src" / part), _tensors(tmp_path / "out" / part),
                             strip)
    # The exported parts load in transformers on their own.
    back_llm = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "llm",
                                                    dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(back_llm(ids).logits.detach().numpy(),
                                  llm(ids).logits.detach().numpy())
    back_tower, info = SiglipVisionModel.from_pretrained(tmp_path / "out" / "vision_tower",
                                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randn(2, 3, 28, 28)
    np.testing.assert_array_equal(back_tower.float().eval()(x).pooler_output.detach().numpy(),
                                  tower(x).pooler_output.detach().numpy())
    # And the export reloads into an identical JAX model.
    again = hf.load_pretrained(str(tmp_path / "out"))
    frames = jnp.asarray(np.random.RandomState(0).randn(2, 28, 28, 3).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(again.encode_video(frames)),
                                  np.asarray(model.encode_video(frames)))
    assert again.cfg == model.cfg


def test_bfloat16_export(tmp_path):
    src = qwen2_hf()
    src.save_pretrained(tmp_path / "src")
    model = hf.load_pretrained(str(tmp_path / "src"))
    hf.save_pretrained(model, str(tmp_path / "out"), dtype=jnp.bfloat16)
    t = load_file(str(tmp_path / "out" / "model.safetensors"))  # the reference reader
    assert t["model.norm.weight"].dtype == torch.bfloat16
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.dtype == torch.bfloat16
    ref = src.model.layers[0].mlp.up_proj.weight.detach().to(torch.bfloat16)
    assert torch.equal(back.model.layers[0].mlp.up_proj.weight, ref)


def test_scanned_layers_import_export_and_params_dir(tmp_path):
    """Stacked (scan_layers) models read and write the same HF tensors, and keep the layout
    through an orbax params directory."""
    from longrl_jax import checkpoint
    src = qwen2_hf(layers=3)
    src.save_pretrained(tmp_path / "src")
    model = hf.load_pretrained(str(tmp_path / "src"), scan_layers=True, remat=True)
    assert model.llm.layers.self_attn.q_proj.kernel.shape[0] == 3
    ids = torch.tensor(np.random.RandomState(0).randint(0, 97, (2, 9)))
    ref = src(ids).logits.detach().numpy()
    out = np.asarray(model.llm(jnp.asarray(ids.numpy())))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4
    hf.save_pretrained(model, str(tmp_path / "out"))
    _assert_same_tensors(_tensors(tmp_path / "src"), _tensors(tmp_path / "out"))
    checkpoint.save_params(model, str(tmp_path / "params"))
    again = checkpoint.load_params(str(tmp_path / "params"))
    assert again.llm.scan_layers
    np.testing.assert_array_equal(np.asarray(again.llm(jnp.asarray(ids.numpy()))), out)
