"""Qwen2.5-VL sharded on 8 fake CPU devices equals the single-device model: the tower with its
temporal patches split over the devices (they encode independently, so MR-SP stage 1 can shard
whole temporal patches), and the M-RoPE LLM with [3, B, T] positions, parameters by the logical
rules (fsdp; fsdp and tensor)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import rel_err

from longrl_jax.models import VLM, ModelConfig, positions
from longrl_jax.models.config import LLMConfig, Qwen25VisionConfig
from longrl_jax.parallel import mesh as mesh_lib

MESHES = {"fsdp8": {"fsdp": 8}, "fsdp2_tensor4": {"fsdp": 2, "tensor": 4}}


def _cfg():
    llm = LLMConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=8, num_kv_heads=4, head_dim=16, tie_word_embeddings=False,
                    mrope_section=(2, 3, 3))
    vision = Qwen25VisionConfig(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                                out_hidden_size=64, window_size=56, fullatt_block_indexes=(1,))
    return ModelConfig(llm=llm, vision=vision, video_token_id=127)


@pytest.fixture(scope="module")
def reference():
    assert jax.device_count() == 8, "conftest must set 8 fake devices before jax loads"
    model = VLM(_cfg(), rngs=nnx.Rngs(3))
    key = jax.random.key(1)
    for _path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, sub = jax.random.split(key)
        var[...] = var[...] + 0.05 * jax.random.normal(sub, var.shape)
    return model


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_tower_and_mrope_llm_equal_single_device(reference, name):
    mesh = mesh_lib.make_mesh(MESHES[name])
    sharded = VLM(_cfg(), rngs=nnx.Rngs(3))
    nnx.update(sharded, jax.tree.map(np.asarray, nnx.state(reference)))
    mesh_lib.shard_model(sharded, mesh)
    specs = [v[...].sharding.spec for _, v in nnx.to_flat_state(nnx.state(sharded.vision_tower))]
    assert any(any(a is not None for a in s) for s in specs), "nothing in the tower was sharded"

    rs = np.random.RandomState(0)
    frames = rs.randn(16, 56, 84, 3).astype(np.float32)          # 8 temporal patches, 2x3 units
    rows = np.full(30, -1)
    rows[4:4 + 24] = np.arange(24)                               # one video: 4 x (2 x 3) rows
    pos = positions.prompt_positions(rows, video_grid_thw=[[4, 4, 6]], second_per_grid_ts=[1.5],
                                     tokens_per_second=2)
    pos_3bt = np.broadcast_to(pos[:, None], (3, 8, 30)).copy()
    ids = rs.randint(0, 120, (8, 30))
    ref_video = reference.encode_video(jnp.asarray(frames))
    ref_logits = reference.llm(jnp.asarray(ids), positions_bt=jnp.asarray(pos_3bt))

    @nnx.jit
    def fwd(model, frames, ids, pos):
        return model.encode_video(frames), model.llm(ids, positions_bt=pos)

    frames_s = jax.device_put(frames, mesh_lib.batch_sharding(mesh, frames.shape,
                                                              leading="frames"))
    ids_s = jax.device_put(ids, mesh_lib.batch_sharding(mesh, ids.shape))
    video, logits = fwd(sharded, frames_s, ids_s, jnp.asarray(pos_3bt))
    assert video.shape == (8, 6, 64)
    assert rel_err(video, ref_video) < 1e-5
    assert rel_err(logits, ref_logits) < 1e-5


def test_temporal_patches_encode_independently(reference):
    """Encoding a video in pieces of whole temporal patches gives the whole video's rows: what
    lets stage 1 split a video over devices and the cache store it per video."""
    frames = np.random.RandomState(1).randn(12, 28, 56, 3).astype(np.float32)
    whole = np.asarray(reference.encode_video(frames))
    pieces = np.concatenate([np.asarray(reference.encode_video(frames[i:i + 4]))
                             for i in range(0, 12, 4)])
    np.testing.assert_allclose(pieces, whole, rtol=1e-6, atol=1e-6)
