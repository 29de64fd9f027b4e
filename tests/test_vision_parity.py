"""SigLIP against transformers, the projector against NumPy and against VILA's torch module,
and the whole `encode_video` path, in float32."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import projector_torch, qwen2_hf, rel_err, siglip_hf, write_longvila
from scipy.special import erf

from longrl_jax.models import hf
from longrl_jax.models.projector import merge_2x2

TOWERS = {
    "with_head": dict(head=True),
    "no_head_odd_grid": dict(head=False, image=35, patch=7, hidden=24, heads=3, inter=36),
    "wide": dict(head=True, hidden=64, heads=8, inter=48, layers=2, image=24, patch=6),
}


@pytest.fixture(scope="module", params=sorted(TOWERS))
def tower_pair(request, tmp_path_factory):
    kw = TOWERS[request.param]
    tower = siglip_hf(**kw)
    llm = qwen2_hf(hidden=40, heads=4, kv=2, inter=48, vocab=64)
    proj = projector_torch(tower.config.hidden_size, 40)
    d = tmp_path_factory.mktemp(request.param)
    write_longvila(str(d), llm, tower, proj)
    return tower, proj, hf.load_pretrained(str(d))


def _frames(tower, n=3, seed=0):
    c = tower.config
    x = np.random.RandomState(seed).uniform(-1, 1, (n, 3, c.image_size, c.image_size))
    return x.astype(np.float32)


def test_siglip_hidden_states_match(tower_pair):
    tower, _, model = tower_pair
    x = _frames(tower)
    ref = tower(torch.tensor(x), output_hidden_states=True)
    x_jax = jnp.asarray(x.transpose(0, 2, 3, 1))
    states = model.vision_tower.hidden_states(x_jax)
    assert len(states) == len(ref.hidden_states)
    for a, b in zip(states, ref.hidden_states):
        assert rel_err(a, b.detach().numpy()) < 1e-4
    last, pooled = model.vision_tower(x_jax)
    assert rel_err(last, ref.last_hidden_state.detach().numpy()) < 1e-4
    if tower.config.vision_use_head:
        assert rel_err(pooled, ref.pooler_output.detach().numpy()) < 1e-4
    else:
        assert pooled is None


def numpy_projector(x, ln_w, ln_b, w1, b1, w2, b2, eps=1e-5):
    """The formula of docs/REFERENCE.md, "Projector formula (mlp_downsample_2x2_fix)", written
    out in NumPy with explicit loops over 2x2 blocks."""
    f, n, dv = x.shape
    g = int(round(n ** 0.5))
    grid = x.reshape(f, g, g, dv)
    gp = g + g % 2
    padded = np.zeros((f, gp, gp, dv), x.dtype)
    padded[:, :g, :g] = grid
    blocks = []
    for r in range(0, gp, 2):
        for c in range(0, gp, 2):
            blocks.append(np.concatenate([padded[:, r, c], padded[:, r, c + 1],
                                          padded[:, r + 1, c], padded[:, r + 1, c + 1]], -1))
    m = np.stack(blocks, axis=1).astype(np.float64)
    mu, var = m.mean(-1, keepdims=True), m.var(-1, keepdims=True)
    h = (m - mu) / np.sqrt(var + eps) * ln_w + ln_b
    h = h @ w1.T + b1
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    return h @ w2.T + b2


@pytest.mark.parametrize("grid", [4, 5, 32])
def test_projector_matches_numpy_formula(grid):
    dv, d = 6, 10
    proj = projector_torch(dv, d, seed=grid)
    x = np.random.RandomState(grid).randn(2, grid * grid, dv).astype(np.float32)
    sd = {k: v.detach().numpy().astype(np.float64) for k, v in proj.state_dict().items()}
    ref = numpy_projector(x, sd["layers.1.weight"], sd["layers.1.bias"], sd["layers.2.weight"],
                          sd["layers.2.bias"], sd["layers.4.weight"], sd["layers.4.bias"])
    assert ref.shape == (2, ((grid + 1) // 2) ** 2, d)
    # VILA's torch module agrees with the formula ...
    assert rel_err(proj(torch.tensor(x)).detach().numpy(), ref) < 1e-5
    # ... and so does ours, loaded through the mapping table.
    from flax import nnx

    from longrl_jax.models.config import ProjectorConfig
    from longrl_jax.models.projector import Projector
    ours = Projector(ProjectorConfig(vision_hidden_size=dv, llm_hidden_size=d), rngs=nnx.Rngs(0))
    params = {"layer_norm.scale": "layers.1.weight", "layer_norm.bias": "layers.1.bias",
              "linear_1.kernel": "layers.2.weight", "linear_1.bias": "layers.2.bias",
              "linear_2.kernel": "layers.4.weight", "linear_2.bias": "layers.4.bias"}
    for path, name in params.items():
        mod, attr = path.split(".")
        arr = sd[name].T if attr == "kernel" else sd[name]
        getattr(getattr(ours, mod), attr)[...] = jnp.asarray(arr, jnp.float32)
    assert rel_err(ours(jnp.asarray(x)), ref) < 1e-5


def test_merge_2x2_order_is_row_major_blocks():
    """Rank-coded patches: each value is its (row, col), so any order error is exact."""
    g = 4
    rc = np.array([[r * 10 + c for c in range(g)] for r in range(g)], np.float32)
    merged = np.asarray(merge_2x2(jnp.asarray(rc.reshape(1, g * g, 1))))[0]
    assert merged.tolist()[0] == [0, 1, 10, 11]
    assert merged.tolist()[1] == [2, 3, 12, 13]
    assert merged.tolist()[2] == [20, 21, 30, 31]


def test_encode_video_matches_torch_pipeline(tower_pair):
    """LongVILA's path: hidden_states[select_layer] of the tower -> projector."""
    tower, proj, model = tower_pair
    x = _frames(tower, n=4, seed=5)
    with torch.no_grad():
        feats = tower(torch.tensor(x), output_hidden_states=True).hidden_states[-2]
        ref = proj(feats).numpy()
    out = model.encode_video(jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert out.shape == ref.shape == (4, model.cfg.tokens_per_frame, 40)
    assert rel_err(out, ref) < 1e-4
    # torch's channels-first pixel_values are accepted as they are
    assert rel_err(model.encode_video(x), ref) < 1e-4


def test_select_layer_from_top_config(tmp_path):
    tower, llm = siglip_hf(head=False), qwen2_hf(hidden=40, heads=4, kv=2, inter=48, vocab=64)
    proj = projector_torch(tower.config.hidden_size, 40)
    write_longvila(str(tmp_path), llm, tower, proj, select_layer=-1)
    model = hf.load_pretrained(str(tmp_path))
    assert model.cfg.vision.select_layer == -1
    x = _frames(tower, n=2)
    with torch.no_grad():
        ref = proj(tower(torch.tensor(x), output_hidden_states=True).hidden_states[-1]).numpy()
    assert rel_err(model.encode_video(jnp.asarray(x.transpose(0, 2, 3, 1))), ref) < 1e-4
    assert json.load(open(tmp_path / "config.json"))["mm_vision_select_layer"] == -1
