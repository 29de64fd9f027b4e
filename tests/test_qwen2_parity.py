"""Qwen2 against transformers in float32: logits at 1e-4 relative, one decoder layer at 1e-5."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import qwen2_hf, rel_err

from longrl_jax.models import hf

CONFIGS = {
    "untied_gqa3": dict(heads=6, kv=2, tied=False),
    "tied_mha": dict(heads=4, kv=4, tied=True, hidden=32, inter=64),
    "gqa7_odd_sizes": dict(heads=7, kv=1, hidden=56, inter=72, vocab=101, layers=3),
    "head_dim_not_hidden_over_heads": dict(heads=4, kv=2, hidden=40, head_dim=12, theta=1e6),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch_model = qwen2_hf(**CONFIGS[request.param])
    d = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(d)
    return torch_model, hf.load_pretrained(str(d))


def test_logits_match_transformers(pair):
    torch_model, model = pair
    vocab = torch_model.config.vocab_size
    ids = np.random.RandomState(1).randint(0, vocab, (3, 17))
    ref = torch_model(torch.tensor(ids)).logits.detach().numpy()
    out = np.asarray(model.llm(jnp.asarray(ids)))
    assert out.shape == (3, 17, vocab)
    assert rel_err(out, ref) < 1e-4
    np.testing.assert_array_equal(np.asarray(model.llm(torch.tensor(ids))), out)  # torch ids too


def test_padded_batch_with_positions_matches(pair):
    """Left padding with an attention mask and explicit positions, as rollout batches have."""
    torch_model, model = pair
    rs = np.random.RandomState(2)
    ids = rs.randint(0, torch_model.config.vocab_size, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[0, :5] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(pos)).logits.detach().numpy()
    out = np.asarray(model.llm(jnp.asarray(ids), positions_bt=jnp.asarray(pos),
                               attention_mask_bt=jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert rel_err(out[valid], ref[valid]) < 1e-4


def test_one_decoder_layer_matches_at_1e5(pair):
    torch_model, model = pair
    cfg = torch_model.config
    x = np.random.RandomState(3).randn(2, 9, cfg.hidden_size).astype(np.float32)
    pos = torch.arange(9)[None].expand(2, 9)
    layer = torch_model.model.layers[1]
    cos, sin = torch_model.model.rotary_emb(torch.tensor(x), pos)
    ref = layer(torch.tensor(x), attention_mask=None, position_ids=pos,
                position_embeddings=(cos, sin))
    ref = (ref[0] if isinstance(ref, tuple) else ref).detach().numpy()
    from longrl_jax.models.layers import dense_attention, rope_cos_sin
    c, s = rope_cos_sin(jnp.asarray(pos.numpy()), model.cfg.llm.head_dim, model.cfg.llm.rope_theta)
    out = model.llm.layers[1](jnp.asarray(x), c, s, None, dense_attention)
    # With no mask, transformers' sdpa path is causal (is_causal for T > 1), as is ours.
    assert rel_err(out, ref) < 1e-5
